"""Shared Lightning behaviour: held-out calibration, test metrics, lean checkpoints."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from defectlab.errors import ConfigError
from defectlab.metrics import calibrate_threshold, image_metrics, pixel_metrics

# Frozen pretrained weights are rebuilt from the backbone config, so checkpoints skip them.
FROZEN_PREFIX = "model.extractor.net."


class AnomalySystem(L.LightningModule):
    """Base of every system: calibrates on the held-out good slice, scores the test set.

    Args:
        model: a pure torch model with ``predict(images) -> AnomalyOutput``.
        threshold: ``eval.threshold`` config (strategy, percentile, n_sigma, value).
    """

    def __init__(self, model: nn.Module, threshold: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.threshold_cfg = dict(threshold or {"strategy": "percentile", "percentile": 99.0})
        calibrate_threshold(torch.zeros(1), **self.threshold_cfg)  # validate the config early
        self.register_buffer("image_threshold", torch.tensor(float("nan")))
        self._val_scores: list[torch.Tensor] = []
        self._test: dict[str, list] = defaultdict(list)
        self.test_results: dict[str, Any] | None = None

    @property
    def threshold(self) -> float | None:
        value = float(self.image_threshold)
        return None if value != value else value  # NaN = not calibrated

    # -- calibration on held-out good images ------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_scores = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val_scores.append(self.model.predict(batch["image"]).score.detach().cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_scores:
            return
        scores = torch.cat(self._val_scores)
        self.image_threshold.fill_(calibrate_threshold(scores, **self.threshold_cfg))
        self.log_dict(
            {"val/score_mean": float(scores.mean()), "val/image_threshold": self.threshold}
        )

    # -- test ------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._test = defaultdict(list)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        out = self.model.predict(batch["image"])
        self._test["score"].append(out.score.detach().cpu())
        self._test["label"].append(batch["label"].cpu())
        self._test["defect_type"].extend(batch["defect_type"])
        self._test["path"].extend(batch["path"])
        if "mask" in batch:
            self._test["map"].append(out.anomaly_map.detach().cpu())
            self._test["mask"].append(batch["mask"].cpu())

    def on_test_epoch_end(self) -> None:
        scores, labels = torch.cat(self._test["score"]), torch.cat(self._test["label"])
        metrics = image_metrics(scores, labels, self.threshold)
        if self._test["mask"]:
            metrics |= pixel_metrics(torch.cat(self._test["map"]), torch.cat(self._test["mask"]))
        self.log_dict({f"test/{k}": v for k, v in metrics.items() if v is not None})
        self.test_results = {
            "metrics": metrics,
            "threshold": {"image": self.threshold, **self.threshold_cfg},
            "predictions": [
                {"path": p, "defect_type": d, "label": int(y), "score": float(s)}
                for p, d, y, s in zip(
                    self._test["path"], self._test["defect_type"], labels, scores, strict=True
                )
            ],
        }

    def configure_optimizers(self) -> None:
        return None

    # -- checkpoints -----------------------------------------------------------------------
    def _backbone_id(self) -> dict | None:
        extractor = getattr(self.model, "extractor", None)
        if extractor is None:
            return None
        return {"name": extractor.name, "layers": extractor.layers, "weights": extractor.weights}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIX)]:
            del state[key]
        checkpoint["defectlab_backbone"] = self._backbone_id()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, current = checkpoint.get("defectlab_backbone"), self._backbone_id()
        if saved is not None and current is not None and saved != current:
            raise ConfigError(
                f"checkpoint was made with backbone {saved} but the config builds {current}: "
                "use the run's saved config (.hydra/config.yaml) or the matching backbone=/backbone.layers="
            )
        state = checkpoint["state_dict"]
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state and not k.startswith(FROZEN_PREFIX))
        if missing:
            raise ConfigError(
                f"checkpoint lacks {missing[:5]}: it was made by another model config"
            )
        # Frozen weights were left out on save; the config rebuilt the same ones (checked above).
        state.update({k: v for k, v in own.items() if k.startswith(FROZEN_PREFIX)})
