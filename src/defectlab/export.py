"""Self-contained deployable artefacts: ``python export.py run_dir=<run> format=onnx|torchscript``.

One file holds everything a line needs: pre-processing (resize, crop, scaling to [0, 1]), the
backbone, the memory bank, the anomaly-map post-processing, the score normalisation and the
thresholds. It takes the decoded image as it comes off the camera, ``uint8`` RGB ``(B, 3, H, W)``
of any size, and returns the same five outputs as ``predict.py``. A small YAML beside it
describes inputs, outputs, thresholds and the measured parity with the Lightning model.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig
from torch import nn
from torchvision.transforms import v2

from defectlab.components.knn import NearestNeighbors
from defectlab.components.resize import ExactResize
from defectlab.data import CategoryIndex, image_tensor, preprocess_uint8, scan_category
from defectlab.errors import ConfigError, DataError, ExportError
from defectlab.imageio import load_image
from defectlab.inference import Predictor
from defectlab.model_file import locate_model, run_folder
from defectlab.models.protocols import BankModel, memory_banks
from defectlab.results import atomic_target

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT = "images"
OUTPUTS = ("score", "score_normalized", "is_defective", "anomaly_map", "segmentation")
# torch's dynamo ONNX exporter (the supported one) emits opset 18 and newer.
MIN_OPSET = 18


class DeployModule(nn.Module):
    """A trained system as one graph: ``uint8`` RGB images ``(B, 3, H, W)`` -> :data:`OUTPUTS`.

    The outputs equal ``AnomalySystem.predict_step``: raw image score, normalised score (float64),
    verdict at the calibrated threshold, normalised anomaly map and binary segmentation.

    Args:
        predictor: the run's rebuilt system and config (on the CPU).
        input_size: ``(H, W)`` the module is built for, resizing with :class:`ExactResize` (any
            runtime reproduces torch exactly); None = any size, resized by torch's own kernel
            (exact only where torch runs it: TorchScript).
    """

    def __init__(self, predictor: Predictor, input_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        data = predictor.run_config.data
        self.image_size = int(data.image_size)
        self.crop_size = None if data.get("crop_size") is None else int(data.crop_size)
        self.brightness = None if data.get("brightness") is None else float(data.brightness)
        self.input_size = None if input_size is None else tuple(input_size)
        size = (self.image_size, self.image_size)
        self.resize = None if input_size is None else ExactResize(self.input_size, size)
        self.model = predictor.system.model
        # Held as a plain attribute, not a submodule: its thresholds and statistics become
        # constants of the graph, which is what a frozen artefact should carry.
        self.__dict__["calibration"] = predictor.system.calibration
        # faiss indexes cannot live in a graph, nor can the blockwise search's data-dependent
        # candidate sets; exact float32 search in one block can (a chunk loop would bake the
        # batch size in).
        self._knn_owners = [m for m in self.model.modules() if isinstance(m, BankModel)]
        for owner in self._knn_owners:
            owner.knn = NearestNeighbors("exact", traceable=True)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` images -> float model input, exactly as ``data.build_transform`` does it."""
        return preprocess_uint8(
            images, self.image_size, self.crop_size, self.resize, self.brightness
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for owner in self._knn_owners:
            # Keeps a reference to the bank buffer (no copy), so the bank is traced as a weight.
            owner.knn.fit(owner.memory_bank)
        out = self.model.predict(self.preprocess(images))
        cal = self.calibration
        return (
            out.score,
            cal.normalize_score(out.score),
            cal.is_defective(out.score),
            cal.normalize_map(out.anomaly_map),
            cal.segment(out.anomaly_map),
        )


def _example(module: DeployModule) -> torch.Tensor:
    # Batch 2 (a size-1 batch would be specialised); an off-size frame when any size is allowed.
    height, width = module.input_size or (module.image_size + 13, module.image_size + 7)
    return torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8)


def _export_torchscript(module: DeployModule, path: Path, opset: int) -> None:
    del opset
    with torch.no_grad(), warnings.catch_warnings():
        # The calibration's floats are meant to become constants of the trace.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # Deprecated upstream in favour of torch.export, but still what C++ lines load.
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning
        )
        traced = torch.jit.trace(module, (_example(module),), check_trace=False)
        torch.jit.save(traced, str(path))


def _export_onnx(module: DeployModule, path: Path, opset: int) -> None:
    if opset < MIN_OPSET:
        raise ConfigError(f"opset={opset}: torch's ONNX exporter needs opset >= {MIN_OPSET}")
    if module.input_size is None:
        raise ConfigError("ONNX export needs a fixed input size (see DeployModule)")
    with torch.no_grad():
        module(_example(module))  # eager warm-up: size-dependent constants (map operators) exist
        torch.onnx.export(
            module,
            (_example(module),),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
            external_data=False,  # one file: the bank and weights are inside it
            verbose=False,
        )


EXPORTERS: dict[str, Callable[[DeployModule, Path, int], None]] = {
    "onnx": _export_onnx,
    "torchscript": _export_torchscript,
}


class Artefact:
    """Run an exported artefact (ONNX via onnxruntime, TorchScript via torch.jit) on uint8 images."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"no exported model at {self.path}: run export.py first")
        if self.path.suffix == FORMATS["onnx"]:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self._session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
            self._module = None
        else:
            self._session = None
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning
                )
                self._module = torch.jit.load(str(self.path), map_location="cpu")

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Score ``uint8`` RGB images ``(B, 3, H, W)``; returns :data:`OUTPUTS` as arrays."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 RGB images (B, 3, H, W), got {images.dtype} {images.shape}"
            )
        if self._session is not None:
            expected = self._session.get_inputs()[0].shape[2:]
            if list(images.shape[2:]) != list(expected):
                raise DataError(
                    f"{self.path} takes images of height x width {expected[0]} x {expected[1]}, "
                    f"got {images.shape[2]} x {images.shape[3]}: resize frames to that size or "
                    "re-export with input_size=[height,width] (or use format=torchscript)"
                )
            values = self._session.run(list(OUTPUTS), {INPUT: images})
        else:
            with torch.no_grad():
                values = [v.numpy() for v in self._module(torch.from_numpy(images))]
        return dict(zip(OUTPUTS, values, strict=True))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_data(run_config: DictConfig) -> CategoryIndex | None:
    """The run's own category index, when its data is on this machine (None otherwise)."""
    try:
        return scan_category(run_config.data.root, run_config.data.category)
    except DataError:
        return None


def parity_images(index: CategoryIndex | None, count: int) -> list[Path]:
    """Up to ``count`` real images, evenly spread over the run's test set (good and defective)."""
    files = [] if index is None or count <= 0 else [s.path for s in index.test]
    if len(files) <= count:
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, count).round().astype(int)]


def measure_parity(
    predictor: Predictor,
    artefact: Artefact,
    images: list[Path],
    frame_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Largest differences between the artefact and the Lightning model on ``images``, one by one.

    With ``frame_size`` (a file built for one input size), each image is first resized to a frame
    of that size, and both models score the same frame.
    """
    to_frame = None if frame_size is None else v2.Resize(frame_size, antialias=True)
    shift, scale = predictor.system.calibration.affine("pixel")
    absolute = dict.fromkeys(("score", "score_normalized", "anomaly_map"), 0.0)
    relative = dict.fromkeys(("score", "anomaly_map"), 0.0)
    verdicts_equal = True
    for path in images:
        raw = image_tensor(load_image(path))
        if to_frame is not None:
            raw = to_frame(raw)
        ref = predictor.score(predictor.transform(raw).unsqueeze(0), [str(path)])
        got = artefact(raw.numpy()[None])
        for key in absolute:
            diff = float(np.abs(got[key][0] - ref[key][0].numpy()).max())
            absolute[key] = max(absolute[key], diff)
        # Relative to the raw scale: a narrow held-out range (a barely trained model) inflates
        # normalised differences without the raw outputs differing any more.
        ref_score = abs(float(ref["score"][0]))
        diff = abs(float(got["score"][0]) - float(ref["score"][0]))
        relative["score"] = max(relative["score"], diff / max(ref_score, 1e-12))
        ref_map = ref["anomaly_map_raw"][0].numpy()
        got_map = got["anomaly_map"][0] * scale + shift
        map_diff = float(np.abs(got_map - ref_map).max()) / max(float(np.abs(ref_map).max()), 1e-12)
        relative["anomaly_map"] = max(relative["anomaly_map"], map_diff)
        verdicts_equal &= bool(got["is_defective"][0]) == bool(ref["is_defective"][0])
    return {
        "images": len(images),
        "max_abs_diff": absolute,
        "max_rel_diff": relative,
        "verdicts_equal": verdicts_equal,
    }


def _sidecar(
    predictor: Predictor,
    module: DeployModule,
    fmt: str,
    artefact: Path,
    opset: int,
    parity: dict,
) -> dict[str, Any]:
    cfg = predictor.run_config
    backbone = cfg.get("backbone")
    model = predictor.system.model
    banks = memory_banks(model)
    return {
        "format": fmt,
        "file": artefact.name,
        "sha256": _sha256(artefact),
        "model": cfg.get("model_name"),
        "backbone": None if backbone is None else backbone.get("name"),
        "category": str(cfg.data.category),
        "model_file": str(predictor.model_file.resolve()),
        "input": {
            "name": INPUT,
            "dtype": "uint8",
            "layout": "NCHW, RGB",
            "size": "any (one size per batch)"
            if module.input_size is None
            else list(module.input_size),
            "preprocessing": {
                "resize": [int(cfg.data.image_size)] * 2,
                "resize_mode": "bilinear, antialiased",
                "crop": cfg.data.get("crop_size"),
                "scale": "1/255",
                "brightness": module.brightness,
            },
        },
        "outputs": {
            "score": "raw image anomaly score (B,)",
            "score_normalized": f"image score, {predictor.system.calibration.normalization} "
            "normalisation (B,) float64",
            "is_defective": "score >= image_threshold (B,) bool",
            "anomaly_map": "normalised anomaly map (B, 1, h, w)",
            "segmentation": "anomaly map >= pixel_threshold (B, 1, h, w) bool",
        },
        "threshold": predictor.system.calibration.as_dict(),
        # Rows over every bank (model.scales=two: fine + coarse), and each bank's shape.
        "memory_bank_rows": sum(len(b) for b in banks) if banks else None,
        "memory_bank_shapes": [list(b.shape) for b in banks],
        "opset": opset if fmt == "onnx" else None,
        "torch": str(torch.__version__),
        "parity": parity,
    }


def _within(parity: dict, tolerance: float) -> bool:
    return parity["verdicts_equal"] and max(parity["max_rel_diff"].values()) <= tolerance


def _input_size(
    cfg: DictConfig, run_config: DictConfig, index: CategoryIndex | None
) -> tuple[int, int] | None:
    """The fixed ``(H, W)`` to build for: ``input_size=``, else the run's training images (ONNX)."""
    if cfg.input_size is not None:
        if len(cfg.input_size) != 2 or min(cfg.input_size) < 1:
            raise ConfigError(f"input_size={cfg.input_size}: give [height, width] in pixels")
        return int(cfg.input_size[0]), int(cfg.input_size[1])
    if cfg.format != "onnx":
        return None
    if index is None:
        raise ConfigError(
            f"input_size=null reads the size of the run's training images, but "
            f"{run_config.data.root}/{run_config.data.category} is not here: give "
            "input_size=[height,width] of the camera frames"
        )
    width, height = load_image(index.train[0].path).size
    return height, width


def export_run(cfg: DictConfig) -> dict[str, Any]:
    """The job behind export.py: write the artefact and its sidecar, after a parity check."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format}: choose one of {sorted(FORMATS)}")
    path, _ = locate_model(cfg.run_dir, cfg.model_path)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_folder(path) / "export"
    target = out_dir / f"model{FORMATS[cfg.format]}"
    predictor = Predictor.from_model(path, "cpu")
    # A second copy to export: DeployModule swaps in the traceable search, the reference keeps its own.
    index = run_data(predictor.run_config)
    input_size = _input_size(cfg, predictor.run_config, index)
    module = DeployModule(Predictor.from_model(path, "cpu"), input_size).eval()
    with atomic_target(target) as tmp:
        EXPORTERS[cfg.format](module, tmp, cfg.opset)
        images = parity_images(index, cfg.parity_images)
        if cfg.parity_images > 0 and not images:
            print(f"parity not checked: no test images under {predictor.run_config.data.root}")
        parity = measure_parity(predictor, Artefact(tmp), images, module.input_size)
        if images and not _within(parity, cfg.parity_tolerance):
            raise ExportError(
                f"exported {cfg.format} model disagrees with the trained model beyond "
                f"parity_tolerance={cfg.parity_tolerance}: {parity}; nothing was written"
            )
    sidecar = _sidecar(predictor, module, cfg.format, target, cfg.opset, parity)
    with atomic_target(target.with_name(target.name + ".yaml")) as tmp:
        tmp.write_text(yaml.safe_dump(sidecar, sort_keys=False))
    size_mb = target.stat().st_size / 2**20
    print(
        f"exported {cfg.format} ({size_mb:.1f} MB) -> {target}; parity on {parity['images']} "
        f"images: max relative difference {parity['max_rel_diff']}, verdicts equal: "
        f"{parity['verdicts_equal']}"
    )
    return sidecar
