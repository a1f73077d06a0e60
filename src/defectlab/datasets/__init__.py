"""Preparers that write other data sources into the MVTec AD layout, once, with a manifest."""

from defectlab.datasets.elpv import ElpvPreparer
from defectlab.datasets.synthetic import SyntheticPreparer

__all__ = ["ElpvPreparer", "SyntheticPreparer"]
