"""Data sets and augmentation: see :func:`build_dataset`."""

from .datasets import DATASETS, DataConfig, DatasetInfo, ShapesDataset, build_dataset, holdout_indices
from .shapes import SHAPE_CLASSES, TEXTURES, ShapesConfig, load_shapes, render_shapes
from .transforms import build_transform

__all__ = [
    "DATASETS", "DataConfig", "DatasetInfo", "ShapesDataset", "build_dataset", "holdout_indices",
    "SHAPE_CLASSES", "TEXTURES", "ShapesConfig", "load_shapes", "render_shapes", "build_transform",
]
