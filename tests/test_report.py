"""The cross-sweep leaderboard: methods x categories, ranked, with plots."""

import csv
import json

import pytest
import yaml

from defectlab.report import collect, leaderboard, main


def _run(folder, model, backbone, category, auroc, speed, overrides=(), status="completed"):
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"data.category={category}", *overrides])
    )
    results = {
        "status": status,
        "model": model,
        "backbone": backbone,
        "data": "synthetic",
        "category": category,
        "metrics": {"image_auroc": auroc, "image_f1": 0.5, "pixel_aupro": 0.9},
        "validation": {},
        "timing": {"fit_s": 1.0, "test_images_per_s": speed},
        "memory": {"peak_rss_mb": 100.0},
    }
    (folder / "results.json").write_text(json.dumps(results))


def test_leaderboard_groups_methods_across_sweeps_and_ranks_them(tmp_path):
    a, b = tmp_path / "sweep_a", tmp_path / "sweep_b"
    _run(a / "0", "patchcore", "resnet18", "brick", 1.0, 20.0, ["model.k=9"])
    _run(a / "1", "patchcore", "resnet18", "grass", 0.8, 22.0, ["model.k=9"])
    _run(a / "2", "patchcore", "resnet18", "grass", 0.9, 22.0, ["model.k=1"])
    _run(b / "0", "feature_knn", "resnet18", "brick", 0.7, 80.0)
    _run(b / "1", "feature_knn", "resnet18", "grass", 0.6, 90.0)
    _run(b / "2", "cae", None, "grass", 0.3, 99.0, status="failed")

    rows = collect([a, b])
    assert len(rows) == 5  # the failed run is not a result
    board = leaderboard(rows)
    methods = [t["method"] for t in board["table"]]
    assert methods == [
        "patchcore [resnet18] model.k=9",
        "patchcore [resnet18] model.k=1",
        "feature_knn [resnet18]",
    ]
    first = board["table"][0]
    assert first["synthetic/brick"] == 1.0 and first["mean"] == pytest.approx(0.9)
    assert board["table"][1]["synthetic/brick"] is None  # that method never ran on brick
    assert board["table"][2]["test_images_per_s"] == pytest.approx(85.0)

    out = tmp_path / "report"
    main([str(a), str(b), "--out", str(out)])
    markdown = (out / "leaderboard.md").read_text()
    assert markdown.index("model.k=9") < markdown.index("feature_knn")
    assert len(list(csv.DictReader((out / "leaderboard.csv").open()))) == 5
    page = (out / "leaderboard.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    with pytest.raises(SystemExit, match="--metric"):
        main([str(a), "--out", str(out), "--metric", "nonsense"])
