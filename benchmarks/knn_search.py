"""Nearest-neighbour options on a trained PatchCore bank: time per image, recall, score error.

    python benchmarks/knn_search.py outputs/<run> [--spec "backend=ivf nprobe=4" ...] [--images 32]
    python benchmarks/knn_search.py outputs/<run> --spec "faiss=PCA32,IVF512,SQ8,RFlat nprobe=4 k_factor_rf=4"

Embeds the first ``--images`` test images of the run with its own model, then searches every
image's patches (k = 1) in the run's memory bank with each ``--spec`` (``model.scales=two``: the
bank ``--bank`` names, ``fine`` by default: four times the coarse bank's rows and queries):

  ``key=value ...``          ``model.knn`` settings (``NearestNeighbors`` arguments), as in conf/
  ``faiss=FACTORY key=v ..`` any faiss ``index_factory`` string, with ``ParameterSpace`` settings
                             (``nprobe``, ``efSearch``, ``k_factor_rf`` ...), to try indexes that
                             ``model.knn`` does not offer (``faiss=Flat``: faiss's exact search)

Without ``--spec``: exact search (the default, and in float32 and bfloat16), faiss's exact flat
search (the default before blockwise search), ``ivf`` with conf/'s settings, faiss's HNSW graph
(``faiss=HNSW32 efSearch=64``: the ``hnsw`` backend, removed because it was slower than exact
search) and the ``experiment=patchcore_realtime`` preset. Per option: index build seconds (exact search: its
low-precision copy of the bank and the precision measurement, once per process; all include
the first search); ms per image's
patches searched right after that image's backbone forward (as in ``predict``: the forward evicts
the index from the CPU caches) and searched again at once (warm); recall of the exact nearest
distance; the mean excess of the patch distances and of each image's largest one (the image
score before Eq. 7) over exact search, all from distances measured directly to the rows found
(a ``faiss=`` row's time is the faiss call alone: its own distances are exact only behind
``RFlat``). The backbone forward's ms per image is printed with them. ``--threads 1 --clock cpu``
times every option on one core in CPU time: comparable between options while other processes
load the machine. Writes
``knn_search.json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import test_image_paths, write_outputs
from omegaconf import OmegaConf

from defectlab.components import NearestNeighbors

# faiss after torch, as the app loads them: each brings its own OpenMP runtime, and with faiss
# loaded first the search of an image's patches right after a backbone forward took 2x as long.
from defectlab.components.knn import faiss
from defectlab.errors import ConfigError
from defectlab.inference import Predictor
from defectlab.models import PatchCore
from defectlab.models.two_scale import TwoScalePatchCore

ROOT = Path(__file__).resolve().parents[1]


def default_specs() -> list[str]:
    """Exact (auto, float32, bfloat16), faiss's flat search, ivf, faiss's HNSW and the real-time preset."""
    knn = OmegaConf.load(ROOT / "conf/model/patchcore.yaml").knn
    knn.pop("_target_")
    preset = OmegaConf.load(ROOT / "conf/experiment/patchcore_realtime.yaml").model.knn
    variants = [
        {"backend": "exact"},
        {"backend": "exact", "precision": "float32"},
        {"backend": "exact", "precision": "bfloat16"},
        {"backend": "ivf"},
        preset,
    ]
    specs = [
        " ".join(f"{k}={v}" for k, v in OmegaConf.merge(knn, variant).items() if v is not None)
        for variant in variants
    ]
    return [*specs[:3], "faiss=Flat", specs[3], "faiss=HNSW32 efSearch=64", *specs[4:]]


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class FactoryIndex:
    """A raw faiss ``index_factory`` index behind the ``fit``/``search`` calls of NearestNeighbors."""

    def __init__(self, factory: str, params: dict) -> None:
        self.factory, self.params = factory, params

    def fit(self, bank: torch.Tensor) -> FactoryIndex:
        self.bank = bank.float()
        data = self.bank.numpy()
        try:
            self.index = faiss.index_factory(data.shape[1], self.factory)
        except RuntimeError as err:
            raise ConfigError(
                f"--spec faiss={self.factory}: faiss cannot build it ({err})"
            ) from err
        self.index.train(data)
        self.index.add(data)
        space = faiss.ParameterSpace()
        for key, value in self.params.items():
            try:
                space.set_index_parameter(self.index, key, value)
            except RuntimeError as err:
                raise ConfigError(f"--spec faiss={self.factory}: no parameter {key}") from err
        return self

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """faiss's own distances: exact behind ``RFlat``, quantised or projected otherwise."""
        squared, idx = self.index.search(queries.contiguous().numpy(), k)
        return torch.from_numpy(squared).clamp_min(0).sqrt(), torch.from_numpy(idx)


def parse_spec(spec: str) -> NearestNeighbors | FactoryIndex:
    """``key=value`` words: NearestNeighbors arguments, or ``faiss=FACTORY`` + faiss parameters."""
    pairs = {}
    for word in spec.split():
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ConfigError(f"--spec {spec!r}: {word!r} is not key=value")
        pairs[key] = value
    if "faiss" in pairs:
        factory = pairs.pop("faiss")
        return FactoryIndex(factory, {k: _value(v) for k, v in pairs.items()})
    try:
        return NearestNeighbors(**{k: _value(v) for k, v in pairs.items()})
    except TypeError as err:
        raise ConfigError(f"--spec {spec!r}: {err} (keys are model.knn's, see conf/)") from err


def _median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


@torch.no_grad()
def measure(
    run_dir: Path, specs: list[str], images: int, clock=time.perf_counter, bank_name: str = "fine"
) -> dict:
    """Time and score every spec on the run's bank (specs are parsed before the model loads)."""
    indexes = [(spec, parse_spec(spec)) for spec in specs]
    predictor = Predictor.from_model(run_dir, "cpu")
    model = predictor.system.model
    if isinstance(model, TwoScalePatchCore):
        if bank_name not in model.members:
            raise SystemExit(f"--bank {bank_name}: this run's banks are {list(model.members)}")
        target = model.members[bank_name]
    elif isinstance(model, PatchCore):
        target, bank_name = model, "bank"
    else:
        raise SystemExit(f"{run_dir}: not a PatchCore run on one backbone (this searches its bank)")
    cfg = predictor.run_config
    paths = test_image_paths(cfg, images)
    batch = [predictor.load(p)[None] for p in paths]
    embedded = [target.embed(x) for x in batch]  # a two-scale bank embeds with the shared backbone
    queries = [e.reshape(-1, e.shape[-1]) for e in embedded]
    bank = target.memory_bank.float()
    exact = NearestNeighbors("exact").fit(bank)
    truth = [exact.search(q, 1)[0][:, 0] for q in queries]
    backbone_s = []
    rows = []
    while indexes:
        # popped: each index is freed after its row (a re-ranking one holds a copy of the bank)
        spec, index = indexes.pop(0)
        start = clock()
        index.fit(bank)
        index.search(queries[0], 1)  # warm-up; exact search prepares itself on its first call
        build_s = clock() - start
        cold, warm, recalled, excess, score_excess = [], [], [], [], []
        for x, q, ref in zip(batch, queries, truth, strict=True):
            start = clock()
            model.extractor(x)
            backbone_s.append(clock() - start)
            start = clock()
            _, idx = index.search(q, 1)
            cold.append(clock() - start)
            start = clock()
            index.search(q, 1)
            warm.append(clock() - start)
            # Scored on distances measured directly to the rows found, whatever the index reports.
            found = idx[:, 0]
            dist = torch.linalg.vector_norm(q - bank[found.clamp_min(0)], dim=1)
            dist = dist.masked_fill(found < 0, float("inf"))
            # by distance, not index: duplicate bank rows make the exact index ambiguous
            recalled.append((dist <= ref * (1 + 1e-5) + 1e-6).float().mean().item())
            excess.append(((dist - ref) / ref.clamp_min(1e-12)).mean().item())
            score_excess.append((dist.max() / ref.max() - 1).item())
        rows.append(
            {
                "spec": spec,
                "build_s": build_s,
                "ms_per_image_after_forward": _median_ms(cold),
                "ms_per_image_warm": _median_ms(warm),
                "recall": statistics.mean(recalled),
                "mean_distance_excess": statistics.mean(excess),
                "mean_image_max_excess": statistics.mean(score_excess),
            }
        )
    return {
        "run": str(run_dir),
        "backbone": cfg.get("backbone_name"),
        "image_size": cfg.data.image_size,
        "bank": bank_name,
        "images": len(batch),
        "patches_per_image": len(queries[0]),
        "bank_rows": len(bank),
        "dim": bank.shape[1],
        "backbone_ms_per_image": _median_ms(backbone_s),
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    lines = [
        f"{result['images']} images x {result['patches_per_image']} patches, {result['bank']} "
        f"{result['bank_rows']} x {result['dim']}; {result.get('threads')} threads, "
        f"{result.get('clock', 'wall')} clock; backbone forward "
        f"{result['backbone_ms_per_image']:.1f} ms per image (batch 1)",
        "",
        "| spec | build s | ms per image after forward | warm ms | recall | mean distance "
        "excess | image max excess |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| `{r['spec']}` | {r['build_s']:.1f} | {r['ms_per_image_after_forward']:.2f} | "
            f"{r['ms_per_image_warm']:.2f} | {r['recall']:.3f} | "
            f"{r['mean_distance_excess']:.2%} | {r['mean_image_max_excess']:.2%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a train.py PatchCore run folder")
    parser.add_argument(
        "--spec", action="append", help="search option (repeat; default: exact, ivf, HNSW, preset)"
    )
    parser.add_argument("--images", type=int, default=32, help="test images searched")
    parser.add_argument(
        "--bank", default="fine", help="model.scales=two: the bank searched (fine | coarse)"
    )
    parser.add_argument("--threads", type=int, help="torch and faiss threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time (with --threads 1, robust to other load on a shared "
        "machine)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
            if faiss is not None:
                faiss.omp_set_num_threads(args.threads)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        result = measure(args.run, args.spec or default_specs(), args.images, clock, args.bank)
        result |= {"clock": args.clock, "threads": torch.get_num_threads()}
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    write_outputs(args.out, "knn_search", result, to_markdown(result))
    return result


if __name__ == "__main__":
    main()
