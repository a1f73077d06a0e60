"""Shared Lightning behaviour: held-out calibration, test metrics, deployable predictions, lean checkpoints.

Trained models are saved and loaded as model files (:mod:`defectlab.model_file`); Lightning
checkpoints are training state only.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc

from defectlab.components.backbone import FeatureExtractor
from defectlab.components.calibration import Calibration
from defectlab.data.batch import Batch, ImageBatch
from defectlab.errors import ConfigError
from defectlab.metrics import ThresholdSpec, image_threshold, pixel_threshold, summarize
from defectlab.metrics.image import both_classes, unit_interval
from defectlab.models.output import AnomalyOutput
from defectlab.systems.reports import FitReport, TestOutputs, TestReport, ValidationReport

# Frozen pretrained weights are rebuilt from the backbone config, so checkpoints skip them.
FROZEN_PREFIX = "model.extractor.net."
HELDOUT, LABELED = 0, 1  # validation dataloader indices (see AnomalyDataModule.val_dataloader)
VAL_SEED_STRIDE = 100_003  # seed offset between repeats of the synthetic validation defects
COARSE_SIDE = 64  # synthetic validation maps/masks are pooled to at most this side (memory)


def _coarse(maps: torch.Tensor) -> torch.Tensor:
    """Average-pool ``(B, 1, H, W)`` maps so the longer side is at most ``COARSE_SIDE``.

    PatchCore's maps are Gaussian-blurred (sigma 4 px), so pooling a 224 px map by 4 hardly
    changes their ranking, while 1,000 held-out images x 4 repeats at full size would hold 800 MB.
    """
    factor = max(1, -(-max(maps.shape[-2:]) // COARSE_SIDE))
    return F.avg_pool2d(maps, factor, ceil_mode=True) if factor > 1 else maps


def _check_evaluation(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Fail at build time, not after fitting, on bad ``eval.*`` values."""
    max_fpr = evaluation.get("max_fpr", 0.3)
    if not 0 < max_fpr <= 1:
        raise ConfigError(f"eval.max_fpr must be in (0, 1], got {max_fpr}")
    bootstrap = evaluation.get("bootstrap") or {}
    if bootstrap.get("n_resamples", 0) < 0:
        raise ConfigError(
            f"eval.bootstrap.n_resamples must be >= 0, got {bootstrap['n_resamples']}"
        )
    if evaluation.get("validation_repeats", 1) < 1:
        raise ConfigError(
            f"eval.validation_repeats must be >= 1, got {evaluation['validation_repeats']}"
        )
    if not 0 < bootstrap.get("confidence", 0.95) < 1:
        raise ConfigError(
            f"eval.bootstrap.confidence must be in (0, 1), got {bootstrap['confidence']}"
        )
    return dict(evaluation)


class AnomalySystem(L.LightningModule):
    """Base of every system: calibrates on held-out data, scores the test set, predicts labels.

    Args:
        model: a pure torch model with ``predict(images) -> AnomalyOutput``.
        threshold: the ``threshold`` config (strategy, percentile, n_sigma, value, pixel_value).
        normalization: ``eval.normalization`` (``none``, ``minmax``, ``threshold``).
        evaluation: ``max_fpr`` (AUPRO limit), ``bootstrap`` (``n_resamples``, ``confidence``,
            ``seed``) and ``validation_repeats`` (synthetic draws per held-out image) from ``eval``.
        validation_anomalies: synthetic defects pasted onto the held-out good images; their
            scores against the clean ones give ``val_synthetic_auroc`` and their maps against
            the pasted masks ``val_synthetic_pixel_auroc``, validation metrics that never touch
            the test set (model selection without labels). None = not computed.
    """

    def __init__(
        self,
        model: nn.Module,
        threshold: Mapping[str, Any] | None = None,
        normalization: str = "threshold",
        evaluation: Mapping[str, Any] | None = None,
        validation_anomalies: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.validation_anomalies = validation_anomalies
        self.threshold_spec = ThresholdSpec(**(threshold or {}))
        self.calibration = Calibration(normalization)
        self.evaluation = _check_evaluation(evaluation or {})
        self.run_config: dict | None = None  # embedded in Lightning (training-state) checkpoints
        self._val: dict[int, dict[str, list]] = {}
        self._test: dict[str, list] = defaultdict(list)
        # Filled by the Lightning hooks below, handed out by validate() / test() as reports.
        self._validation = ValidationReport()
        self._test_report: TestReport | None = None

    # -- the steps the jobs call: each returns its report -----------------------------------
    def fit(self, trainer: L.Trainer, datamodule: L.LightningDataModule) -> FitReport:
        """Fit the model on ``datamodule``'s training images, calibrating on held-out ones."""
        raise NotImplementedError

    def validate(self, trainer: L.Trainer, datamodule: L.LightningDataModule) -> ValidationReport:
        """Calibrate thresholds on the held-out images; metrics on validation data only."""
        trainer.validate(self, datamodule=datamodule, verbose=False)
        return self._validation

    def test(self, trainer: L.Trainer, datamodule: L.LightningDataModule) -> TestReport:
        """Score the test set with the calibrated thresholds."""
        self._test_report = None
        # verbose=False: Lightning's table would list every per-type key; format_summary prints ours.
        trainer.test(self, datamodule=datamodule, verbose=False)
        if self._test_report is None:
            raise RuntimeError("the test pass ended without scoring the test set")
        return self._test_report

    def predict_images(self, images: torch.Tensor) -> AnomalyOutput:
        """``model.predict`` on images ``(B, 3, H, W)`` (memory banks slice it)."""
        return self.model.predict(images)

    # -- calibration on held-out data (never the test set) ---------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {}

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = HELDOUT) -> None:
        out = self.predict_images(batch["image"])
        store = self._val.setdefault(dataloader_idx, defaultdict(list))
        amap = out.anomaly_map.detach().float().cpu()
        store["score"].append(out.score.detach().cpu())
        store["map_max"].append(amap.flatten(1).amax(1))
        store["map_min"].append(amap.flatten(1).amin(1))
        if dataloader_idx == LABELED:
            store["label"].append(batch["label"].cpu())
            if "mask" in batch:
                store["map"].append(amap)
                store["mask"].append(batch["mask"].cpu())
        elif self.validation_anomalies is not None:
            for repeat in range(self.evaluation.get("validation_repeats", 1)):
                # Fixed seed per batch and repeat: every epoch and every trial sees the same
                # defects (repeat 0 draws what a single draw always drew).
                seed = self.validation_anomalies.seed + batch_idx + VAL_SEED_STRIDE * repeat
                pasted, masks = self.validation_anomalies(
                    batch["image"], torch.Generator().manual_seed(seed)
                )
                out = self.predict_images(pasted)
                store["synthetic_score"].append(out.score.detach().cpu())
                store["synthetic_map"].append(_coarse(out.anomaly_map.detach().float().cpu()))
                store["synthetic_mask"].append(_coarse(masks.float().cpu()) > 0.5)

    def on_validation_epoch_end(self) -> None:
        if HELDOUT not in self._val:
            return
        good = {k: torch.cat(v) for k, v in self._val[HELDOUT].items()}
        val = {k: torch.cat(v) for k, v in self._val.get(LABELED, {}).items()}
        spec = self.threshold_spec
        img_thr = image_threshold(spec, good["score"], val.get("score"), val.get("label"))
        pix_thr = pixel_threshold(spec, good["map_max"], val.get("map"), val.get("mask"))
        self.calibration.fit(
            img_thr,
            pix_thr,
            good["score"],
            float(good["map_min"].min()),
            float(good["map_max"].max()),
        )
        self._validation = ValidationReport(self._validation_metrics(good, val))
        self.log_dict({f"val/{k[4:]}": v for k, v in self._validation.metrics.items()})
        self.log_dict(
            {
                "val/score_mean": float(good["score"].float().mean()),
                "val/image_threshold": img_thr,
                "val/pixel_threshold": pix_thr,
            }
        )

    @staticmethod
    def _validation_metrics(good: dict, val: dict) -> dict[str, float]:
        """Image AUROC on validation data only: synthetic defects and/or ``data.val_dir``."""
        out = {}
        if "synthetic_score" in good:
            scores = torch.cat([good["score"], good["synthetic_score"]]).float()
            labels = torch.cat(
                [torch.zeros(len(good["score"])), torch.ones(len(good["synthetic_score"]))]
            ).long()
            # unit_interval: torchmetrics would squash scores outside [0, 1] with a sigmoid.
            out["val_synthetic_auroc"] = float(binary_auroc(unit_interval(scores), labels))
            # Pixel AUROC over the pasted images' maps: how well the model localises defects it
            # has never seen. How far it ranks configurations like test metrics do, per data set:
            # docs/methods/patchcore-features.md#label-free-model-selection
            masks = good["synthetic_mask"].flatten()
            if both_classes(masks, "synthetic validation masks"):
                maps = unit_interval(good["synthetic_map"].flatten())
                out["val_synthetic_pixel_auroc"] = float(binary_auroc(maps, masks.long()))
        if "label" in val and both_classes(val["label"], "validation"):
            scores = unit_interval(val["score"].float())
            out["val_image_auroc"] = float(binary_auroc(scores, val["label"].long()))
        return out

    # -- test ------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._test = defaultdict(list)
        if not self.calibration.fitted:
            warnings.warn(
                "model has no calibrated threshold (no held-out images): thresholded metrics "
                "are reported as null",
                stacklevel=2,
            )

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        out = self.predict_images(batch["image"])
        self._test["score"].append(out.score.detach().cpu())
        self._test["label"].append(batch["label"].cpu())
        self._test["defect_type"].extend(batch["defect_type"])
        self._test["path"].extend(batch["path"])
        if "mask" in batch and self.localizes:
            self._test["map"].append(out.anomaly_map.detach().float().cpu())
            self._test["mask"].append(batch["mask"].cpu())
        self._test["has_mask"].append("mask" in batch)
        return {"score": out.score, "anomaly_map": out.anomaly_map}

    @property
    def localizes(self) -> bool:
        """False for image-level models (flat maps): pixel metrics and heatmaps do not apply.

        Trained models segment (pixel maps); memory-bank models say so themselves.
        """
        return True

    def on_test_epoch_end(self) -> None:
        scores, labels = torch.cat(self._test["score"]), torch.cat(self._test["label"])
        maps = torch.cat(self._test["map"]) if self._test["map"] else None
        masks = torch.cat(self._test["mask"]) if self._test["mask"] else None
        fitted = self.calibration.fitted
        summary = summarize(
            scores,
            labels,
            self._test["defect_type"],
            image_threshold=float(self.calibration.image_threshold) if fitted else None,
            maps=maps,
            masks=masks,
            pixel_threshold=float(self.calibration.pixel_threshold) if fitted else None,
            max_fpr=self.evaluation.get("max_fpr", 0.3),
            bootstrap=self.evaluation.get("bootstrap"),
        )
        if any(self._test["has_mask"]) and not self.localizes:
            # Masks exist but the model scores whole images: "not applicable", never a number.
            summary["metrics"] |= dict.fromkeys(("pixel_auroc", "pixel_aupro", "pixel_f1"))
        logged = {f"test/{k}": v for k, v in summary["metrics"].items()}
        for defect_type, row in summary["per_defect_type"].items():
            logged |= {f"test/{defect_type}/{k}": v for k, v in row.items()}
        self.log_dict({k: float(v) for k, v in logged.items() if v is not None})

        normalized = self.calibration.normalize_score(scores)
        predicted = self.calibration.is_defective(scores) if fitted else [None] * len(scores)
        self._test_report = TestReport(
            **summary,
            localization=self.localizes,
            threshold={**asdict(self.threshold_spec), **self.calibration.as_dict()},
            predictions=[
                {
                    "path": p,
                    "defect_type": d,
                    "label": int(y),
                    "score": float(s),
                    "score_normalized": float(n),
                    "predicted": None if yhat is None else int(yhat),
                }
                for p, d, y, s, n, yhat in zip(
                    self._test["path"],
                    self._test["defect_type"],
                    labels,
                    scores,
                    normalized,
                    predicted,
                    strict=True,
                )
            ],
            outputs=TestOutputs(
                scores=scores,
                labels=labels,
                defect_types=list(self._test["defect_type"]),
                maps=maps,
                masks=masks,
            ),
        )

    # -- deployment ------------------------------------------------------------------------
    def predict_step(self, batch: ImageBatch, batch_idx: int) -> dict[str, Any]:
        """Decisions a line would act on: normalised score, label, normalised map, binary mask."""
        if not self.calibration.fitted:
            raise ConfigError("model is not calibrated: train it with data.val_ratio > 0 first")
        out = self.predict_images(batch["image"])
        return {
            "path": batch.get("path"),
            "score": out.score,
            "score_normalized": self.calibration.normalize_score(out.score),
            "is_defective": self.calibration.is_defective(out.score),
            "anomaly_map": self.calibration.normalize_map(out.anomaly_map),
            "anomaly_map_raw": out.anomaly_map,
            "segmentation": self.calibration.segment(out.anomaly_map),
        }

    def configure_optimizers(self) -> None:
        return None

    # -- checkpoints -----------------------------------------------------------------------
    def _extractors(self) -> dict[str, FeatureExtractor]:
        """State-dict prefix -> frozen backbone, for each backbone in the model (ensembles: several)."""
        return {
            f"model.{name}.": module
            for name, module in self.model.named_modules()
            if isinstance(module, FeatureExtractor)
        }

    def _frozen_prefixes(self) -> list[str]:
        # Pretrained frozen weights are rebuilt from the config on load; a random init or
        # fine-tuned weights (U-Net, model.finetune=true) cannot be, so they stay in the checkpoint.
        return [f"{prefix}net." for prefix, ext in self._extractors().items() if ext.frozen]

    def _backbone_id(self) -> dict | None:
        ids = {
            prefix: {"name": ext.name, "layers": ext.layers, "weights": ext.weights}
            for prefix, ext in self._extractors().items()
        }
        if not ids:
            return None
        # One backbone: the format of earlier checkpoints.
        return ids.get(FROZEN_PREFIX.removesuffix("net."), ids)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Lightning checkpoints (training state only: resuming) skip frozen pretrained weights.

        Trained models are used from their model file (:mod:`defectlab.model_file`), never from
        a Lightning checkpoint. A random init cannot be rebuilt, so its weights stay.
        """
        state = checkpoint["state_dict"]
        frozen = tuple(self._frozen_prefixes())
        for key in [k for k in state if frozen and k.startswith(frozen)]:
            del state[key]
        checkpoint["defectlab_backbone"] = self._backbone_id()
        checkpoint["defectlab_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, current = checkpoint.get("defectlab_backbone"), self._backbone_id()
        if saved is not None and current is not None and saved != current:
            raise ConfigError(
                f"checkpoint was made with backbone {saved} but the config builds {current}: "
                "use the run's saved config (.hydra/config.yaml) or the matching backbone=/backbone.layers="
            )
        state = checkpoint["state_dict"]
        own = self.state_dict()
        rebuilt = tuple(f"{prefix}net." for prefix in self._extractors())

        def frozen(key: str) -> bool:
            return bool(rebuilt) and key.startswith(rebuilt)

        missing = sorted(k for k in own if k not in state and not frozen(k))
        if missing:
            raise ConfigError(
                f"checkpoint lacks {missing[:5]}: it was made by another model config"
            )
        # Pretrained frozen weights were left out on save; the config rebuilt the same ones
        # (checked above). Saved ones (a random init) are loaded as they are.
        state.update({k: v for k, v in own.items() if frozen(k) and k not in state})
