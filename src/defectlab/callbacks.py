"""Lightning callbacks: per-image visual outputs written while the test set streams past."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L

from defectlab.data.batch import Batch
from defectlab.errors import ConfigError
from defectlab.visualize import display_image, image_panel

if TYPE_CHECKING:
    from defectlab.systems import AnomalySystem


class AnomalyImageWriter(L.Callback):
    """Write ``<folder>/<category>/<defect_type>/<image>.png`` panels for test images.

    Panels: original, heatmap, overlay, binary segmentation at the calibrated pixel threshold, and
    the ground-truth contour (green) when a mask exists. Written per batch, so no maps are kept.

    Args:
        folder: where the ``<category>/`` tree goes (the run's ``images/``).
        category: the data category (first path level).
        max_per_type: images per test folder (``good`` and each defect type), in path order;
            None writes all, 0 none (``eval.images.max_per_type``).
    """

    def __init__(self, folder: str | Path, category: str, max_per_type: int | None = 10) -> None:
        if max_per_type is not None and max_per_type < 0:
            raise ConfigError(
                f"eval.images.max_per_type must be >= 0 or null (all), got {max_per_type}"
            )
        self.folder = Path(folder) / category
        self.max_per_type = max_per_type
        self.written: Counter[str] = Counter()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.written = Counter()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: AnomalySystem,
        outputs: Any,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        calibration = pl_module.calibration
        if self.max_per_type == 0 or not calibration.fitted or not isinstance(outputs, dict):
            return
        vmin, threshold = float(calibration.pixel_min), float(calibration.pixel_threshold)
        maps = outputs["anomaly_map"].detach().float().cpu()
        segmentation = calibration.segment(maps)
        score = outputs["score"].detach().cpu()
        normalized = calibration.normalize_score(score)
        thr_norm = float(
            calibration.normalize_score(calibration.image_threshold.reshape(1).cpu())[0]
        )
        decisions = calibration.is_defective(score)
        for i, defect_type in enumerate(batch["defect_type"]):
            if self.max_per_type is not None and self.written[defect_type] >= self.max_per_type:
                continue
            self.written[defect_type] += 1
            mask = batch["mask"][i, 0].bool().cpu().numpy() if "mask" in batch else None
            verdict = "DEFECTIVE" if bool(decisions[i]) else "good"
            title = f"{defect_type} | {float(normalized[i]):.2f} / thr {thr_norm:.2f} -> {verdict}"
            localizes = pl_module.localizes
            panel = image_panel(
                display_image(batch["image"][i]),
                maps[i, 0].numpy() if localizes else None,
                segmentation[i, 0].numpy() if localizes else None,
                mask,
                vmin,
                threshold,
                title,
            )
            out = self.folder / defect_type / f"{Path(batch['path'][i]).stem}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            panel.save(out)

    @property
    def count(self) -> int:
        """Images written in the last test epoch."""
        return sum(self.written.values())
