"""ELPV solar-cell electroluminescence images (PyPI ``elpv-dataset``) in MVTec AD layout.

Licence of the data: CC BY-NC-SA 4.0 (Buerhop-Lutz et al.; Deitsch et al.). Split per cell type
(``mono``, ``poly``): the cells with defect probability 0 are shuffled with ``seed``;
``train_ratio`` of them go to ``train/good``, the rest to ``test/good``; cells whose probability is
at least ``defect_threshold`` go to ``test/defective``; cells in between are left out.
"""

import shutil
from pathlib import Path

import numpy as np

from defectlab.datasets.cache import prepare_category
from defectlab.errors import ConfigError, DataError

CELL_TYPES = ("mono", "poly")


def _labels() -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    try:
        import elpv_dataset
    except ImportError as err:
        raise DataError(
            "data=elpv needs the package elpv-dataset: pip install elpv-dataset"
        ) from err
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    table = np.genfromtxt(labels, dtype=["U64", "<f8", "U8"], names=["path", "probability", "type"])
    return labels.parent, table["path"], table["probability"], table["type"]


class ElpvPreparer:
    """Write ELPV into ``<root>/<mono|poly>/{train,test}`` (see module docstring for the split).

    Args:
        categories: cell types to write.
        train_ratio: share of probability-0 cells used for training.
        defect_threshold: minimum defect probability of a cell counted as defective.
        seed: seeds the train/test split of good cells.
    """

    def __init__(
        self,
        categories: tuple[str, ...] = CELL_TYPES,
        train_ratio: float = 0.6,
        defect_threshold: float = 1.0,
        seed: int = 0,
    ) -> None:
        unknown = set(categories) - set(CELL_TYPES)
        if unknown:
            raise ConfigError(
                f"data.prepare.categories: {sorted(unknown)} unknown; ELPV has {CELL_TYPES}"
            )
        if not 0 < train_ratio < 1:
            raise ConfigError(f"data.prepare.train_ratio must be in (0, 1), got {train_ratio}")
        if not 0 < defect_threshold <= 1:
            raise ConfigError(
                f"data.prepare.defect_threshold must be in (0, 1], got {defect_threshold}"
            )
        self.categories = tuple(categories)
        self.train_ratio = train_ratio
        self.defect_threshold = defect_threshold
        self.seed = seed

    def __call__(self, root: Path) -> None:
        image_dir, paths, probs, types = _labels()
        for cell_type in self.categories:
            params = {
                "source": "elpv-dataset",
                "category": cell_type,
                "train_ratio": self.train_ratio,
                "defect_threshold": self.defect_threshold,
                "seed": self.seed,
            }
            sel = types == cell_type

            def write(out: Path, sel: np.ndarray = sel) -> None:
                good = paths[sel & (probs == 0)]
                bad = paths[sel & (probs >= self.defect_threshold)]
                order = np.random.default_rng(self.seed).permutation(len(good))
                n_train = round(self.train_ratio * len(good))
                groups = {
                    "train/good": good[order[:n_train]],
                    "test/good": good[order[n_train:]],
                    "test/defective": bad,
                }
                for folder, names in groups.items():
                    (out / folder).mkdir(parents=True)
                    for name in names:
                        shutil.copyfile(image_dir / name, out / folder / Path(name).name)

            prepare_category(Path(root), cell_type, params, write)
