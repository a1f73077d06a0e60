"""Which defect is it? Few-shot defect-type classification of images an anomaly model flagged.

Each defective image is described by its anomalous region: the backbone's patch embeddings
weighted by the anomaly map (models with a feature extractor, e.g. PatchCore), plus simple region
statistics (area, shape, position, intensity). A labeled support set of a few images per type
classifies the rest by nearest prototype or k nearest neighbours.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)

from defectlab.data import scan_category, scan_labeled
from defectlab.errors import ConfigError, DataError
from defectlab.inference import Predictor, expand_input
from defectlab.model_file import locate_model
from defectlab.models.protocols import PatchEmbeddingModel
from defectlab.results import write_json_atomic

REGION_STATS = (
    "area",
    "centroid_y",
    "centroid_x",
    "log_aspect",
    "log_elongation",
    "fill",
    "intensity_inside",
    "intensity_contrast",
    "red_minus_blue",
    "peak",
)
METHODS = ("prototype", "knn")


@dataclass
class Descriptors:
    """Per image: map-weighted embedding ``(N, D)`` (or None) and region statistics ``(N, S)``."""

    paths: list[Path]
    embeddings: torch.Tensor | None
    stats: torch.Tensor


def region_stats(image: torch.Tensor, amap: torch.Tensor, threshold: float) -> torch.Tensor:
    """:data:`REGION_STATS` of the region where ``amap`` ``(H, W)`` reaches ``threshold``.

    An image whose map never reaches the threshold is described by its top 1 % pixels instead, so
    every flagged image (and every missed one) gets a region.
    """
    region = amap >= threshold
    if not region.any():
        region = amap >= torch.quantile(amap.flatten().float(), 0.99)
    h, w = amap.shape
    ys, xs = torch.nonzero(region, as_tuple=True)
    yf, xf = ys.float() / h, xs.float() / w
    height = (yf.max() - yf.min()) + 1 / h
    width = (xf.max() - xf.min()) + 1 / w
    coords = torch.stack([yf - yf.mean(), xf - xf.mean()])
    eig = torch.linalg.eigvalsh(coords @ coords.T / len(ys) + 1e-6 * torch.eye(2))
    gray = image.mean(0)
    inside = gray[region].mean()
    outside = gray[~region].mean() if (~region).any() else inside
    return torch.stack(
        [
            region.float().mean(),
            yf.mean(),
            xf.mean(),
            torch.log(height / width),
            0.5 * torch.log(eig[1] / eig[0]),
            len(ys) / (height * width * h * w),
            inside,
            inside - outside,
            (image[0] - image[2])[region].mean(),
            (amap.max() - threshold) / max(abs(threshold), 1e-12),
        ]
    ).float()


def _weighted_embedding(patches: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
    """Patch embeddings ``(h, w, D)`` averaged with weights from the map above its 90th percentile."""
    h, w, _ = patches.shape
    weights = F.adaptive_avg_pool2d(amap[None, None].float(), (h, w))[0, 0]
    weights = (weights - torch.quantile(weights.flatten(), 0.9)).clamp_min(0)
    if weights.sum() <= 0:
        weights = (weights == weights.max()).float()
    weights = weights / weights.sum()
    return torch.einsum("hw,hwd->d", weights, patches.float())


def _maps_and_patches(
    predictor: Predictor, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw anomaly maps ``(B, H, W)`` and, where the model has them, the patch features
    ``(B, h, w, D)`` those maps were scored from: one backbone pass per image."""
    model, images = predictor.system.model, images.to(predictor.device)
    if not isinstance(model, PatchEmbeddingModel):
        return predictor.system.predict_images(images).anomaly_map[:, 0].cpu(), None
    out, emb = model.predict_embedded(images)  # backbone in slices of embed_batch, as predict
    return out.anomaly_map[:, 0].cpu(), emb.cpu()


@torch.no_grad()
def describe(predictor: Predictor, paths: list[Path], batch_size: int = 16) -> Descriptors:
    """Descriptors of the images at ``paths`` (region from the model's raw anomaly map)."""
    system = predictor.system
    if not system.localizes:
        raise ConfigError(
            "defect types are classified from the anomalous region, and this model gives no "
            "anomaly map (model=feature_knn): use a run of patchcore, cae or unet"
        )
    if not system.calibration.fitted:
        raise ConfigError("model is not calibrated: train it with data.val_ratio > 0 first")
    threshold = float(system.calibration.pixel_threshold)
    embeddings, stats = [], []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = torch.stack([predictor.load(p) for p in chunk])
        maps, patches = _maps_and_patches(predictor, images)
        for i in range(len(chunk)):
            stats.append(region_stats(images[i], maps[i], threshold))
            if patches is not None:
                embeddings.append(_weighted_embedding(patches[i], maps[i]))
    return Descriptors(
        list(paths), torch.stack(embeddings) if embeddings else None, torch.stack(stats)
    )


class DefectTypeClassifier:
    """Nearest prototype or k-NN over [L2-normalised embedding, standardised region stats].

    Hand-written (a few tensor lines) rather than scikit-learn, which is not a runtime dependency;
    the standardisation is fitted on the support set only.

    Args:
        method: ``prototype`` (class means) or ``knn`` (majority of the ``k`` nearest).
        k: neighbours for ``knn``.
        embedding_weight: weight of the embedding block (0 = region statistics only).
        stats_weight: weight of the region-statistics block (0 = embedding only).
    """

    def __init__(
        self,
        method: str = "prototype",
        k: int = 1,
        embedding_weight: float = 1.0,
        stats_weight: float = 1.0,
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"method={method}: choose one of {METHODS}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        if embedding_weight < 0 or stats_weight < 0 or embedding_weight + stats_weight == 0:
            raise ConfigError(
                "embedding_weight and stats_weight must be >= 0 and not both 0, got "
                f"{embedding_weight} and {stats_weight}"
            )
        self.method, self.k = method, k
        self.embedding_weight, self.stats_weight = embedding_weight, stats_weight

    def _features(self, d: Descriptors, rows: torch.Tensor) -> torch.Tensor:
        blocks = []
        if d.embeddings is not None and self.embedding_weight > 0:
            blocks.append(self.embedding_weight * F.normalize(d.embeddings[rows], dim=1))
        if self.stats_weight > 0:
            z = (d.stats[rows] - self._mean) / self._std
            blocks.append(self.stats_weight * z / d.stats.shape[1] ** 0.5)
        return torch.cat(blocks, dim=1)

    def fit(self, d: Descriptors, rows: torch.Tensor, labels: torch.Tensor) -> DefectTypeClassifier:
        """Learn from support images ``rows`` of ``d`` with integer ``labels``."""
        support = d.stats[rows]
        self._mean = support.mean(0)
        # One example per type gives few rows; a floor keeps constant features from exploding.
        self._std = support.std(0, unbiased=False).clamp_min(1e-3)
        self._support = self._features(d, rows)
        self._labels = labels
        self._classes = int(labels.max()) + 1
        if self.method == "prototype":
            self._prototypes = torch.stack(
                [self._support[labels == c].mean(0) for c in range(self._classes)]
            )
        return self

    def predict(self, d: Descriptors, rows: torch.Tensor) -> torch.Tensor:
        """Integer labels of images ``rows`` of ``d``."""
        query = self._features(d, rows)
        if self.method == "prototype":
            return torch.cdist(query, self._prototypes).argmin(1)
        k = min(self.k, len(self._labels))
        nearest = torch.cdist(query, self._support).topk(k, largest=False).indices
        votes = F.one_hot(self._labels[nearest], self._classes).sum(1)
        return votes.argmax(1)


def _metrics(pred: torch.Tensor, truth: torch.Tensor, classes: int) -> dict[str, Any]:
    return {
        "accuracy": float(multiclass_accuracy(pred, truth, classes, average="micro")),
        "macro_f1": float(multiclass_f1_score(pred, truth, classes, average="macro")),
        "confusion": multiclass_confusion_matrix(pred, truth, classes),
    }


def evaluate_splits(
    d: Descriptors,
    labels: torch.Tensor,
    types: list[str],
    classifier: DefectTypeClassifier,
    support: int | str,
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    """Accuracy, macro-F1 and confusion over repeated seeded splits, or leave-one-out.

    ``support=N``: per repeat, N random images per type are labeled and the rest queried.
    ``support="loo"``: each image is queried against all the others.
    """
    classes = len(types)
    counts = Counter(labels.tolist())
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    accuracies, f1s = [], []
    if support == "loo":
        rows = torch.arange(len(labels))
        preds = torch.empty_like(labels)
        for i in range(len(labels)):
            rest = rows[rows != i]
            preds[i] = classifier.fit(d, rest, labels[rest]).predict(d, rows[i : i + 1])[0]
        m = _metrics(preds, labels, classes)
        accuracies, f1s, confusion = [m["accuracy"]], [m["macro_f1"]], m["confusion"]
        queried = counts
    else:
        short = {types[c]: n for c, n in counts.items() if n <= support}
        if short:
            raise ConfigError(
                f"support={support} leaves no query image for {short} (images per type): lower "
                "support, or use support=loo"
            )
        for r in range(repeats):
            g = torch.Generator().manual_seed(seed + r)
            support_rows, query_rows = [], []
            for c in range(classes):
                members = torch.nonzero(labels == c)[:, 0]
                members = members[torch.randperm(len(members), generator=g)]
                support_rows.append(members[:support])
                query_rows.append(members[support:])
            s_rows, q_rows = torch.cat(support_rows), torch.cat(query_rows)
            preds = classifier.fit(d, s_rows, labels[s_rows]).predict(d, q_rows)
            m = _metrics(preds, labels[q_rows], classes)
            accuracies.append(m["accuracy"])
            f1s.append(m["macro_f1"])
            confusion += m["confusion"]
        queried = {c: n - support for c, n in counts.items()}
    total = sum(queried.values())
    return {
        "types": types,
        "support": support,
        "repeats": 1 if support == "loo" else repeats,
        "images_per_type": {types[c]: n for c, n in sorted(counts.items())},
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "macro_f1": float(np.mean(f1s)),
        "macro_f1_std": float(np.std(f1s)),
        # Uniform guessing, and always answering the largest type of the query set.
        "chance_accuracy": 1 / classes,
        "majority_accuracy": max(queried.values()) / total,
        "confusion": {"rows_true_cols_predicted": types, "counts": confusion.tolist()},
    }


def _defective(run_config: DictConfig) -> tuple[list[Path], list[str]]:
    index = scan_category(run_config.data.root, run_config.data.category)
    samples = [s for s in index.test if s.label == 1]
    return [s.path for s in samples], [s.defect_type for s in samples]


def _query_folder(folder: Path) -> tuple[list[Path], list[str] | None]:
    """Images of a folder to classify: ``<type>/`` subfolders (known types) or flat (unknown)."""
    if not folder.is_dir():
        raise DataError(f"query_dir={folder} is not a folder")
    if any(p.is_dir() for p in folder.iterdir()):
        samples = [s for s in scan_labeled(folder, None) if s.label == 1]
        return [s.path for s in samples], [s.defect_type for s in samples]
    return expand_input(str(folder)), None


def plot_confusion(result: dict[str, Any], path: Path) -> Path:
    """Confusion-matrix heatmap of a defect-type evaluation."""
    from matplotlib.figure import Figure

    types = result["confusion"]["rows_true_cols_predicted"]
    counts = np.asarray(result["confusion"]["counts"])
    fig = Figure(figsize=(1.2 + 0.7 * len(types), 1.0 + 0.6 * len(types)))
    ax = fig.subplots()
    ax.imshow(counts, cmap="Blues")
    for (i, j), v in np.ndenumerate(counts):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(types)), types)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        f"support {result['support']}: accuracy {result['accuracy']:.3f} "
        f"(chance {result['chance_accuracy']:.3f})",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def run_classification(cfg: DictConfig) -> dict[str, Any]:
    """The job behind classify_defects.py: writes into its own folder, never into the run."""
    path, _ = locate_model(cfg.run_dir, cfg.model_path)
    out_dir = Path(cfg.paths.output_dir)
    support = cfg.support
    if not (support in ("all", "loo") or (isinstance(support, int) and support >= 1)):
        raise ConfigError(f"support={support}: give a number >= 1 of images per type, loo or all")
    classifier = DefectTypeClassifier(cfg.method, cfg.k, cfg.embedding_weight, cfg.stats_weight)
    predictor = Predictor.from_model(path, cfg.device)
    paths, names = _defective(predictor.run_config)
    types = sorted(set(names))
    if len(types) < 2:
        raise DataError(
            f"{predictor.run_config.data.root}/{predictor.run_config.data.category}/test has "
            f"defect types {types}: at least two are needed to classify"
        )
    labels = torch.tensor([types.index(n) for n in names])
    category = str(predictor.run_config.data.category)
    if support == "all":
        if cfg.query_dir is None:
            raise ConfigError("support=all learns from the run's test defects: give query_dir=")
        query_paths, query_names = _query_folder(Path(cfg.query_dir))
        # One descriptor set: the run's defects first (support), then the queried images.
        described = describe(predictor, paths + query_paths, cfg.batch_size)
        rows = torch.arange(len(paths))
        preds = classifier.fit(described, rows, labels).predict(
            described, torch.arange(len(paths), len(described.paths))
        )
        result: dict[str, Any] = {
            "support": "all",
            "types": types,
            "predictions": [
                {"path": str(p), "predicted": types[int(c)]}
                for p, c in zip(query_paths, preds, strict=True)
            ],
        }
        if query_names is not None:
            unknown = sorted(set(query_names) - set(types))
            if unknown:
                raise DataError(f"query_dir has types {unknown} that the run's test set lacks")
            truth = torch.tensor([types.index(n) for n in query_names])
            m = _metrics(preds, truth, len(types))
            result |= {
                "accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"],
                "chance_accuracy": 1 / len(types),
                "majority_accuracy": max(Counter(query_names).values()) / len(query_names),
                "confusion": {"rows_true_cols_predicted": types, "counts": m["confusion"].tolist()},
            }
    else:
        described = describe(predictor, paths, cfg.batch_size)
        result = evaluate_splits(
            described, labels, types, classifier, support, cfg.repeats, cfg.seed
        )
    result |= {
        "category": category,
        "method": cfg.method,
        "k": cfg.k,
        "features": {
            "embedding": described.embeddings is not None and cfg.embedding_weight > 0,
            "region_stats": list(REGION_STATS) if cfg.stats_weight > 0 else [],
        },
    }
    if "confusion" in result:
        plot = plot_confusion(result, out_dir / "plots" / f"defect_types_support_{support}.png")
        result["plot"] = str(plot)
    result["model_file"] = str(path.resolve())
    write_json_atomic(out_dir / "defect_types.json", result)
    if "accuracy" in result:
        print(
            f"defect types of {category} ({len(types)} types, support {support}): accuracy "
            f"{result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} "
            f"(chance {result['chance_accuracy']:.4f}, majority {result['majority_accuracy']:.4f})"
        )
    else:
        print(f"classified {len(result['predictions'])} images of {cfg.query_dir}")
    return result
