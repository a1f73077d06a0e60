"""Per-run plots: a test set of good images only (the getting-started case) and the per-type bars."""

import torch

from defectlab.visualize import _defect_types, save_run_plots


def _results(per_type, confusion):
    return {
        "metrics": {"image_auroc": None, "image_aupr": None},
        "threshold": {"image_threshold": 0.5},
        "per_defect_type": per_type,
        "confusion_matrix": confusion,
    }


def test_good_images_only_write_plots_without_per_type_bars(tmp_path):
    outputs = {"scores": torch.rand(6), "labels": torch.zeros(6, dtype=torch.long), "maps": None}
    per_type = {"widget/good": {"n": 6, "false_positive_rate": 0.0}}
    plots = save_run_plots(outputs, _results(per_type, {"tp": None}), tmp_path)
    assert "per_defect_type" not in plots and plots["roc"].is_file()


def test_per_type_bars_leave_out_the_good_images():
    per_type = {
        "mono/good": {"n": 5, "false_positive_rate": 0.2},
        "mono/crack": {"n": 3, "image_auroc": 0.9, "image_recall": 0.5, "pixel_aupro": None},
    }
    assert _defect_types(per_type) == (["mono/crack"], ["image_auroc", "image_recall"])


def test_per_type_plot_is_written_with_defects(tmp_path):
    outputs = {"scores": torch.rand(8), "labels": torch.tensor([0] * 5 + [1] * 3), "maps": None}
    per_type = {
        "mono/good": {"n": 5, "false_positive_rate": 0.2},
        "mono/crack": {"n": 3, "image_auroc": 0.9, "image_recall": 0.5},
    }
    plots = save_run_plots(
        outputs, _results(per_type, {"tn": 4, "fp": 1, "fn": 1, "tp": 2}), tmp_path
    )
    assert plots["per_defect_type"].is_file()
