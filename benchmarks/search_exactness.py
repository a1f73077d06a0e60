"""PatchCore's exact search against brute force on a run's test set: same scores, same AUROC.

    python benchmarks/search_exactness.py outputs/<run> [--images N] [--no-fp64] [--out DIR]

Loads a trained PatchCore run (its model file), embeds its test images with its own model, and
scores every image three ways (``model.scales=two``: each bank searched each way, the two distance
maps summed by the model's own ``combine``, the image score their maximum):

  ``model``       the model's own ``score_patches``: exact blockwise search, Eq. 7 from the bank
                  neighbours stored at fit time;
  ``faiss_fp32``  faiss's exact flat search in float32 (the default before blockwise search), and
                  a second search of m* for Eq. 7's bank neighbours, as the paper code does;
  ``brute_fp64``  a float64 brute force (``torch.cdist``) for both searches, ties to the lower
                  bank index (``--no-fp64`` leaves it out: minutes per 100 images at 1024 dims).

Eq. 7 is evaluated with the model's own float32 formula for all three, so any difference comes from
the searches. Reports each image AUROC (exact pair counting in float64: no thresholds, no
sigmoid), whether it is bit-identical to the model's, the largest image-score difference, and the
share of patches whose nearest bank row differs. Writes ``search_exactness.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import write_outputs

from defectlab.components.knn import faiss
from defectlab.data import scan_category
from defectlab.inference import Predictor
from defectlab.models import PatchCore
from defectlab.models.two_scale import TwoScalePatchCore


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(defective scores above good) + half the ties, over all pairs, in float64."""
    pos, neg = scores[labels == 1].double(), scores[labels == 0].double()
    wins = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    return float(wins.mean())


def brute64(queries: torch.Tensor, bank64: torch.Tensor, k: int):
    """float64 distances and indices of the k nearest rows (ties: lower index).

    ``cdist``'s product form in float64: its ~1e-14 relative error is far below float32's.
    """
    d = torch.cdist(queries.double(), bank64)
    if k == 1:  # min returns the first of equal minima
        dist, idx = d.min(dim=1, keepdim=True)
        return dist, idx
    idx = d.argsort(dim=1, stable=True)[:, :k]
    return d.gather(1, idx), idx


def faiss32(queries: torch.Tensor, bank: torch.Tensor, k: int):
    """faiss's exact flat search (float32 squared distances)."""
    squared, idx = faiss.knn(queries.contiguous().numpy(), bank.numpy(), k)
    return torch.from_numpy(squared).clamp_min(0).sqrt(), torch.from_numpy(idx)


def eq7(
    model, dist: torch.Tensor, idx: torch.Tensor, patches: torch.Tensor, search
) -> torch.Tensor:
    """Image scores from ``(B, L)`` nearest distances / rows, N_b(m*) found by ``search``."""
    s_star, p_star = dist.max(dim=1)
    if model.k == 1:
        return s_star
    m_star = idx.gather(1, p_star[:, None])[:, 0]
    support = search(model.memory_bank[m_star], model.k)[1]  # N_b(m*), (B, k)
    m_test = patches.gather(1, p_star[:, None, None].expand(-1, 1, patches.shape[-1]))
    d = torch.linalg.vector_norm(m_test - model.memory_bank[support], dim=-1)
    return (1.0 - torch.exp(s_star - torch.logsumexp(d, dim=1))) * s_star


@torch.no_grad()
def measure(run: Path, images: int | None, fp64: bool = True) -> dict:
    predictor = Predictor.from_model(run, "cpu")
    model = predictor.system.model
    if not isinstance(model, (PatchCore, TwoScalePatchCore)):
        raise SystemExit(f"{run}: not a PatchCore run on one backbone")
    cfg = predictor.run_config
    samples = scan_category(cfg.data.root, cfg.data.category).test[:images]
    names = list(model.members) if isinstance(model, TwoScalePatchCore) else ["bank"]
    searches = {}  # search name -> one search function per bank
    for name in ("faiss_fp32", "brute_fp64") if fp64 else ("faiss_fp32",):
        searches[name] = []
        for member in model.bank_models():
            bank = member.memory_bank.float().contiguous()
            if name == "faiss_fp32":
                searches[name].append(lambda q, k, bank=bank: faiss32(q, bank, k))
            else:
                bank64 = bank.double()
                searches[name].append(lambda q, k, bank64=bank64: brute64(q, bank64, k))
    scores = {"model": [], **{name: [] for name in searches}}
    nn_differs = dict.fromkeys(searches, 0)
    patches_total = 0
    for sample in samples:
        emb = model.embed(predictor.load(sample.path)[None])
        _, score = model.score_patches(emb)
        scores["model"].append(score)
        embs = emb if isinstance(model, TwoScalePatchCore) else (emb,)
        flats = [e.reshape(-1, e.shape[-1]) for e in embs]
        owns = [
            m.knn.search(f, 1)[1][:, 0] for m, f in zip(model.bank_models(), flats, strict=True)
        ]
        patches_total += sum(len(f) for f in flats)
        for name, per_bank in searches.items():
            found = [search(f, 1) for search, f in zip(per_bank, flats, strict=True)]
            nn_differs[name] += sum(
                int((idx[:, 0] != own).sum()) for (_, idx), own in zip(found, owns, strict=True)
            )
            if isinstance(model, TwoScalePatchCore):
                maps = [
                    d.float().view(1, 1, *e.shape[1:3])
                    for (d, _), e in zip(found, embs, strict=True)
                ]
                scores[name].append(model.combine(*maps).flatten(1).amax(dim=1))
            else:
                dist, idx = found[0]
                dist = dist.float().view(1, -1)  # as the model returns them
                scores[name].append(eq7(model, dist, idx.view(1, -1), flats[0][None], per_bank[0]))
    labels = torch.tensor([s.label for s in samples])
    cat = {name: torch.cat(v) for name, v in scores.items()}
    model_auroc = auroc(cat["model"], labels)
    banks = model.bank_models()
    result = {
        "run": str(run),
        "banks": {n: list(m.memory_bank.shape) for n, m in zip(names, banks, strict=True)},
        "k": banks[0].k if len(banks) == 1 else None,  # two banks: the summed map's maximum
        "images": len(samples),
        "patches": patches_total,
        "auroc": {name: auroc(v, labels) for name, v in cat.items()},
    }
    for name in searches:
        result[name] = {
            "auroc_bit_identical": result["auroc"][name] == model_auroc,
            "max_image_score_difference": float((cat[name] - cat["model"]).abs().max()),
            "image_scores_identical": bool(torch.equal(cat[name], cat["model"])),
            "patches_with_another_nearest_row": nn_differs[name],
        }
    return result


def to_markdown(r: dict) -> str:
    lines = [
        f"{r['images']} test images, {r['patches']} patches, banks "
        + ", ".join(f"{name} {rows} x {dim}" for name, (rows, dim) in r["banks"].items())
        + (f", k = {r['k']}" if r["k"] else ", image score = maximum of the summed map"),
        "",
        "| search | image AUROC | bit-identical to the model's | max image-score difference "
        "| patches with another nearest row |",
        "|---|---|---|---|---|",
        f"| model (exact blockwise, stored Eq. 7 neighbours) | {r['auroc']['model']!r} | — | — | — |",
    ]
    for name in ("faiss_fp32", "brute_fp64"):
        if name not in r:
            continue
        row = r[name]
        lines.append(
            f"| {name} | {r['auroc'][name]!r} | {row['auroc_bit_identical']} | "
            f"{row['max_image_score_difference']:.3g} | {row['patches_with_another_nearest_row']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a train.py PatchCore run folder")
    parser.add_argument("--images", type=int, help="first N test images (default: all)")
    parser.add_argument("--no-fp64", action="store_true", help="leave out the float64 brute force")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if faiss is None:
        raise SystemExit("faiss is not installed: pip install faiss-cpu")
    result = measure(args.run, args.images, fp64=not args.no_fp64)
    write_outputs(args.out, "search_exactness", result, to_markdown(result))
    return result


if __name__ == "__main__":
    main()
