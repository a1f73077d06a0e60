"""Inspection web app: ``python app.py run_dir=<run>`` (Gradio).

Pick a trained run, upload images, see original | heatmap | overlay, the score and the verdict
for each; the threshold slider re-judges the scored images live (no re-inference). The scoring is
``predict.py``'s: same model file, pre-processing, thresholds and normalisation.

Uploads are untrusted input: at most ``max_files`` per upload, ``max_file_mb`` each (also enforced
by the server), only image file types, and at most ``max_image_pixels`` pixels, checked from the
header before decoding (the data loader's decompression-bomb guard). A refused file gets a
message in the verdicts; nothing crashes. The app listens on 127.0.0.1 unless ``host=`` says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from defectlab.components import FeatureExtractor
from defectlab.data import IMAGE_EXTENSIONS
from defectlab.errors import ConfigError, DataError
from defectlab.imageio import ImageLimits
from defectlab.inference import Predictor
from defectlab.model_file import LEGACY_CHECKPOINT, MODEL_FILE
from defectlab.visualize import display_image, heatmap_rgb, overlay_rgb

COLUMNS = ["file", "score", "normalised score", "verdict"]


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may hold (``app.yaml``: max_files, max_file_mb, max_image_pixels)."""

    max_files: int = 20
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        for key, value in [
            ("max_files", self.max_files),
            ("max_file_mb", self.max_bytes),
            ("max_image_pixels", self.max_pixels),
        ]:
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")

    def too_many(self, count: int) -> str | None:
        """The message refusing an upload of ``count`` files, or None when it is allowed."""
        if count <= self.max_files:
            return None
        return (
            f"{count} files uploaded; at most {self.max_files} are inspected at a time "
            "(max_files=). Upload fewer at once."
        )

    def refuse(self, path: Path) -> str | None:
        """Why ``path`` is not decoded at all (type or file size), or None."""
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            return (
                f"not an accepted image type ({path.suffix or 'no extension'}); "
                f"accepted: {', '.join(sorted(IMAGE_EXTENSIONS))}"
            )
        size = path.stat().st_size
        if size > self.max_bytes:
            return (
                f"{size / 2**20:.3g} MB exceeds the upload limit of "
                f"{self.max_bytes / 2**20:.3g} MB per file (max_file_mb=)"
            )
        return None


@dataclass
class Inspected:
    """One uploaded image after scoring (``error`` set when it could not be read)."""

    name: str
    score: float | None = None
    score_normalized: float | None = None
    tiles: list[tuple[np.ndarray, str]] | None = None
    error: str | None = None


def discover_runs(roots: Iterable[str | Path]) -> list[Path]:
    """Run folders holding a trained model under ``roots`` (train.py outputs and multiruns)."""
    found: set[Path] = set()
    for root in roots:
        root = Path(root)
        if (root / MODEL_FILE).is_file():
            found.add(root.resolve())
        elif root.is_dir():
            found.update(p.parents[1].resolve() for p in root.rglob(str(MODEL_FILE)))
    return sorted(found)


def legacy_runs(roots: Iterable[str | Path]) -> list[Path]:
    """Older run folders under ``roots`` with only a pickle-based model.ckpt (not loadable)."""
    found: set[Path] = set()
    for root in (Path(r) for r in roots):
        hits = [root / LEGACY_CHECKPOINT] if (root / LEGACY_CHECKPOINT).is_file() else []
        if not hits and root.is_dir():
            hits = list(root.rglob(str(LEGACY_CHECKPOINT)))
        found.update(
            p.parents[1].resolve() for p in hits if not (p.parent / MODEL_FILE.name).exists()
        )
    return sorted(found)


def describe(predictor: Predictor) -> dict[str, Any]:
    """What is loaded: model, backbone, category and the calibrated threshold."""
    cfg = predictor.run_config
    # The model's own backbone (PatchCore, feature-kNN, U-Net); none for the CAE and ensembles.
    extractor = next(
        (m for m in predictor.system.model.children() if isinstance(m, FeatureExtractor)), None
    )
    cal = predictor.system.calibration.as_dict()
    return {
        "model": cfg.get("model_name"),
        "backbone": None if extractor is None else extractor.alias,
        "category": str(cfg.data.category),
        "normalization": cal["normalization"],
        "threshold": cal.get("image_threshold_normalized"),
    }


def inspect_images(
    predictor: Predictor, paths: list[Path], limits: UploadLimits | None = None
) -> list[Inspected]:
    """Score uploaded files one by one (sizes may differ); refused ones carry their reason.

    Refused: a file type the data loader does not read, a file above the size limit, an image
    above the pixel limit (the app's or the run's ``data.max_image_pixels``, whichever is lower;
    read from the header, before decoding) and anything that does not decode.
    """
    limits = limits or UploadLimits()
    system = predictor.system
    cal = system.calibration
    run = predictor.limits
    decode = (
        ImageLimits(run.min_side, limits.max_pixels, "max_image_pixels (app)")
        if limits.max_pixels < run.max_pixels
        else run
    )
    results = []
    for path in paths:
        refused = limits.refuse(path)
        if refused is not None:
            results.append(Inspected(path.name, error=refused))
            continue
        try:
            image = predictor.load(path, decode)
        except DataError as err:
            results.append(Inspected(path.name, error=str(err)))
            continue
        out = predictor.score(image.unsqueeze(0), [str(path)])
        original = display_image(image)
        tiles = [(original, "original")]
        if system.localizes:
            heat = heatmap_rgb(
                out["anomaly_map_raw"][0, 0].numpy(),
                float(cal.pixel_min),
                float(cal.pixel_threshold),
            )
            tiles += [(heat, "heatmap"), (overlay_rgb(original, heat), "overlay")]
        results.append(
            Inspected(
                path.name,
                float(out["score"][0]),
                float(out["score_normalized"][0]),
                [(tile, f"{path.name}: {kind}") for tile, kind in tiles],
            )
        )
    return results


def verdict(item: Inspected, threshold: float) -> str:
    """``DEFECTIVE`` / ``good`` at a threshold on the normalised score (``unreadable`` on errors)."""
    if item.error is not None:
        return "unreadable"
    return "DEFECTIVE" if item.score_normalized >= threshold else "good"


def table(items: list[Inspected], threshold: float) -> list[list[Any]]:
    """Rows of :data:`COLUMNS`."""
    return [
        [
            item.name,
            None if item.score is None else round(item.score, 6),
            None if item.score_normalized is None else round(item.score_normalized, 4),
            verdict(item, threshold),
        ]
        for item in items
    ]


def verdict_text(items: list[Inspected], threshold: float) -> str:
    """One Markdown line per image, the headline a line operator reads."""
    if not items:
        return "Upload images to inspect them."
    lines = []
    for item in items:
        if item.error is not None:
            lines.append(f"- `{item.name}`: **unreadable** ({item.error})")
        else:
            lines.append(
                f"- `{item.name}`: **{verdict(item, threshold)}** "
                f"(normalised score {item.score_normalized:.3f}, threshold {threshold:.3f})"
            )
    return "\n".join(lines)


class ModelSlot:
    """The one loaded model; switching runs frees the previous one (banks can be large)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.run: Path | None = None
        self.predictor: Predictor | None = None

    def get(self, run: str | Path) -> Predictor:
        run = Path(run)
        if self.predictor is None or run != self.run:
            self.predictor = None  # release before loading the next
            self.predictor = Predictor.from_model(run, self.device)
            self.run = run
        return self.predictor


def _header(predictor: Predictor, run: Path) -> str:
    info = describe(predictor)
    backbone = f" · backbone **{info['backbone']}**" if info["backbone"] else ""
    return (
        f"Loaded: model **{info['model']}**{backbone} · category **{info['category']}** · "
        f"calibrated threshold **{info['threshold']:.3f}** ({info['normalization']} "
        f"normalisation)  \n`{run}`"
    )


def inspect_upload(
    predictor: Predictor, files: list[str] | None, limits: UploadLimits
) -> tuple[list[Inspected], str | None]:
    """The inspected files of one upload, or ``([], message)`` when the upload is refused."""
    if not files:
        return [], None
    refused = limits.too_many(len(files))
    if refused is not None:
        return [], refused
    return inspect_images(predictor, [Path(f) for f in files], limits), None


def build_app(
    runs: list[Path], default: Path, device: str = "auto", limits: UploadLimits | None = None
):
    """The Gradio Blocks app over ``runs`` (``default`` loaded first)."""
    import gradio as gr

    limits = limits or UploadLimits()
    slot = ModelSlot(device)
    first = slot.get(default)
    default_threshold = describe(first)["threshold"]
    choices = [str(r) for r in runs]

    def load(run: str):
        predictor = slot.get(run)
        threshold = describe(predictor)["threshold"]
        return (
            _header(predictor, Path(run)),
            gr.update(value=threshold),
            [],
            [],
            verdict_text([], 0),
        )

    def run_inspection(run: str, files: list[str] | None, threshold: float):
        items, refused = inspect_upload(slot.get(run), files, limits)
        if refused is not None:
            return [], [], f"**Upload refused:** {refused}", []
        if not items:
            return [], [], verdict_text([], threshold), []
        gallery = [tile for item in items for tile in item.tiles or []]
        return gallery, table(items, threshold), verdict_text(items, threshold), items

    def rejudge(items: list[Inspected], threshold: float):
        return table(items or [], threshold), verdict_text(items or [], threshold)

    with gr.Blocks(title="defectlab inspection") as app:
        gr.Markdown("# defectlab inspection")
        run_box = gr.Dropdown(choices, value=str(default), label="Trained model (run folder)")
        header = gr.Markdown(_header(first, default), elem_id="loaded")
        with gr.Row():
            files = gr.File(
                file_count="multiple",
                file_types=sorted(IMAGE_EXTENSIONS),
                label=f"Images (up to {limits.max_files}, {limits.max_bytes / 2**20:.3g} MB each)",
                elem_id="upload",
            )
            threshold = gr.Slider(
                # Normalised scores are 0 at the held-out good images' minimum: a part can score
                # below it, so the slider reaches below 0 too.
                -1.0,
                max(2.0, 2 * default_threshold),
                value=default_threshold,
                step=0.01,
                label="Threshold on the normalised score (default: the calibrated one)",
                elem_id="threshold",
            )
        verdicts = gr.Markdown(verdict_text([], default_threshold), elem_id="verdicts")
        results = gr.Dataframe(headers=COLUMNS, label="Scores", elem_id="scores")
        gallery = gr.Gallery(label="original | heatmap | overlay", columns=3, elem_id="gallery")
        state = gr.State([])

        run_box.change(load, run_box, [header, threshold, gallery, results, verdicts])
        files.change(
            run_inspection, [run_box, files, threshold], [gallery, results, verdicts, state]
        )
        threshold.change(rejudge, [state, threshold], [results, verdicts])
    return app


def run_app(cfg: DictConfig, block: bool = True):
    """The job behind app.py: find runs, load the chosen one, serve the app."""
    # No telemetry calls from a shop-floor machine (and none work offline).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if cfg.run_dir is None and not cfg.runs:
        raise ConfigError("give run_dir=<train run folder> and/or runs=[folders to search]")
    roots = [*(cfg.runs or []), *([cfg.run_dir] if cfg.run_dir else [])]
    runs = discover_runs(roots)
    old = legacy_runs(roots)
    if old:
        print(
            f"{len(old)} older run folder(s) hold only a pickle-based {LEGACY_CHECKPOINT} and are "
            f"not offered, e.g. {old[0]}; convert trusted ones once: python -m defectlab.convert "
            "<run folder> --trust"
        )
    if not runs:
        raise ConfigError(f"no trained run (a folder with {MODEL_FILE}) under {cfg.runs}")
    default = Path(cfg.run_dir).resolve() if cfg.run_dir else runs[0]
    if default not in runs:
        raise ConfigError(f"run_dir={cfg.run_dir}: no {MODEL_FILE} there")
    limits = UploadLimits(cfg.max_files, int(cfg.max_file_mb * 2**20), cfg.max_image_pixels)
    app = build_app(runs, default, cfg.device, limits)
    app.queue(max_size=cfg.queue_size)
    app.launch(
        server_name=cfg.host,
        server_port=cfg.port,
        max_file_size=limits.max_bytes,  # the server refuses larger uploads before storing them
        share=False,
        ssr_mode=False,  # no Node server: plain FastAPI serving the bundled front end
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return app
