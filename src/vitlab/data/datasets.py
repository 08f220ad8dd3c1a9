"""Data sets by name: the embedded ``shapes``, ``cifar10``/``cifar100`` and ``imagefolder:PATH``.

Every data set yields ``(PIL image, class index)`` before its transform, and is described by a
:class:`DatasetInfo` (classes, native image size, normalisation statistics) that the trainer and
the analyses use, so nothing downstream needs to know which data set it is.

Image folders are taken as they come from the wild. Every file is converted to RGB on loading
(greyscale, palette, CMYK and 16-bit images; transparent ones are composited over white, see
:func:`~vitlab.data.images.to_rgb`), and every image whose size is not the data set's is resized and centre-cropped
to it (:class:`~vitlab.data.transforms.FitSize`), so mixed files still collate into batches.
Files that cannot be decoded at all (damaged, truncated, not images) are found once, by decoding
every file when the data set is built, and skipped with one warning naming how many and the
first few; a folder where nothing can be read is an error. Large folders keep that scan's result
in the vitlab cache directory, so later runs start at once.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from ..errors import VitlabError, unknown_name_error
from ..options import option
from .images import DecodedCache, load_rgb, scan_images
from .shapes import SHAPE_CLASSES, TEXTURE_MODES, ShapesConfig, default_cache_dir, load_shapes
from .transforms import AUGMENTATIONS, build_transform

DATASETS = ("shapes", "cifar10", "cifar100", "imagefolder:PATH")

_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _known_data_set(name: str) -> bool:
    parse_name(name)  # an unknown name raises its own line, with the closest names
    return True


@dataclass
class DataConfig:
    """Which data, at what size, with which augmentation. Saved in every run's ``config.yaml``."""

    name: str = option("shapes", key="data", check=_known_data_set, metavar="NAME",
                       help="shapes (embedded), cifar10, cifar100 or imagefolder:PATH")
    image_size: int | None = option(None, metavar="PX", check=lambda v: v >= 8, must="be at least 8 pixels",
                                    help="train and analyse at this image side (none: the data set's own)")
    root: str | None = option(None, key="data_root", metavar="DIR",
                              help="where CIFAR lives (none: $VITLAB_CACHE/data, i.e. ~/.cache/vitlab/data)")
    download: bool = option(False, help="download CIFAR if it is missing (needs the network; never done unasked)")
    num_train: int = option(20_000, metavar="N", check=lambda v: v >= 1, must="be at least 1",
                            help="shapes: images in the training split")
    num_val: int = option(2_000, metavar="N", check=lambda v: v >= 1, must="be at least 1",
                          help="shapes: images in the validation split")
    texture_mode: str = option("random", choices=TEXTURE_MODES,
                               help="shapes: how object texture relates to class ('match' makes both shape and "
                                    "texture predict the class, the training set for a shape-bias study)")
    val_fraction: float = option(0.1, metavar="F", check=lambda v: 0 < v < 1, must="be between 0 and 1",
                                 help="image folders without train/ and val/: the seeded class-balanced fraction "
                                      "held out for validation")
    split_seed: int | None = option(None, metavar="N",
                                    help="seed of the validation split (an image folder's hold-out, shapes' "
                                         "validation images), so runs of several seeds share one validation set "
                                         "(none: the run's seed)")
    augment: str = option("crop-flip", choices=AUGMENTATIONS, help="augmentation preset")
    randaugment: str | None = option(None, metavar="CFG",
                                     help="timm RandAugment config, e.g. rand-m9-mstd0.5 ('none' or none: off)")
    crop_scale: float = option(0.8, metavar="S", check=lambda v: 0 < v <= 1, must="be in (0, 1]",
                               help="resized-crop-flip: the smallest fraction of the image area a crop keeps")
    crop_padding: int | None = option(None, metavar="PX", check=lambda v: v >= 0, must="be 0 or more",
                                      help="crop-flip: pixels of zero padding on each side before the random crop, "
                                           "i.e. the largest shift (none: an eighth of the side, 4 at 32x32)")
    num_workers: int = option(0, metavar="N", check=lambda v: v >= 0, must="be 0 or more",
                              help="data-loading worker processes (0 loads in the training process)")


@dataclass
class DatasetInfo:
    """What the rest of vitlab needs to know about a data set."""

    name: str
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    extras: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """The number of classes (the length of ``classes``)."""
        return len(self.classes)


class ShapesDataset(Dataset):
    """A rendered ``shapes`` split. Besides ``(image, label)`` it exposes per-image ``masks``
    (object pixels, (N, H, W) bool) and ``textures`` (texture label of the object)."""

    def __init__(self, cfg: ShapesConfig, transform: Callable | None = None, progress: bool = False) -> None:
        arrays = load_shapes(cfg, progress=progress)
        self.images = arrays.images.permute(0, 2, 3, 1).contiguous().numpy()  # NHWC for PIL
        self.targets = arrays.labels.tolist()
        self.masks, self.textures = arrays.masks, arrays.textures
        self.classes = list(SHAPE_CLASSES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


def dataset_stats(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Normalisation (mean, std) of the data set ``name``: CIFAR's own, 0.5 for the others."""
    kind, _ = parse_name(name)
    return _CIFAR_STATS.get(kind, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))


def parse_name(name: str) -> tuple[str, str | None]:
    """Split ``imagefolder:PATH`` into ``("imagefolder", PATH)``; other names have no path."""
    kind, _, path = name.partition(":")
    if kind == "imagefolder":
        if not path:
            raise VitlabError("imagefolder needs a path: use --data imagefolder:/path/to/folder")
        return kind, path
    if kind not in ("shapes", "cifar10", "cifar100") or path:
        raise unknown_name_error("data set", name, DATASETS)
    return kind, None


def build_dataset(cfg: DataConfig, split: str, train_transform: bool | None = None,
                  seed: int = 0, progress: bool = False, normalize: bool = True) -> tuple[Dataset, DatasetInfo]:
    """The ``split`` (``"train"`` or ``"val"``) of the data set ``cfg`` names, with its transform.

    ``train_transform`` picks the augmenting transform (default: for the train split). The
    shapes splits are rendered from seeds derived from ``seed`` so they never share an image;
    ``cfg.split_seed``, when set, takes the place of ``seed`` for the validation split (and for
    an image folder's hold-out, which decides both splits).
    ``normalize=False`` yields pixels in [0, 1] instead of normalised ones.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not '{split}'")
    kind, path = parse_name(cfg.name)
    split_seed = seed if cfg.split_seed is None else cfg.split_seed
    if kind == "shapes":
        size = cfg.image_size or 32
        n = cfg.num_train if split == "train" else cfg.num_val
        # Even seeds render training images, odd ones validation images: the two never coincide.
        render_seed = 2 * seed if split == "train" else 2 * split_seed + 1
        shapes_cfg = ShapesConfig(num_images=n, image_size=size, seed=render_seed,
                                  texture_mode=cfg.texture_mode)
        dataset = ShapesDataset(shapes_cfg, progress=progress)
        info = DatasetInfo("shapes", list(SHAPE_CLASSES), size)
    elif kind in _CIFAR_STATS:
        dataset, info = _cifar(kind, cfg, split)
    else:
        dataset, info = _imagefolder(path, cfg, split, split_seed, progress=progress)
    if len(dataset) == 0:
        raise VitlabError(f"the {split} split of '{cfg.name}' is empty; check the data set and its options")
    native = info.image_size
    if cfg.image_size:
        info.image_size = cfg.image_size
    augment = split == "train" if train_transform is None else train_transform
    transform = build_transform(info.image_size, info.mean, info.std, train=augment, augment=cfg.augment,
                                randaugment=cfg.randaugment, native_size=native, normalize=normalize,
                                crop_scale=cfg.crop_scale, crop_padding=cfg.crop_padding)
    _set_transform(dataset, transform)
    return dataset, info


def _set_transform(dataset: Dataset, transform: Callable) -> None:
    target = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(dataset, Subset):
        # Subsets of one folder share the underlying data set: give each split its own transform.
        dataset.dataset = _WithTransform(target, transform)
    else:
        target.transform = transform


class _WithTransform(Dataset):
    """A view of a data set (yielding PIL images) with a transform of its own."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label


def _cifar(kind: str, cfg: DataConfig, split: str) -> tuple[Dataset, DatasetInfo]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if kind == "cifar10" else CIFAR100
    root = Path(cfg.root or default_cache_dir() / "data")
    try:
        # CIFAR's official test split serves as validation: it is never trained on.
        dataset = cls(str(root), train=split == "train", download=cfg.download)
    except RuntimeError:
        raise VitlabError(
            f"{kind} is not in {root}; pass --download to fetch it, or --data-root DIR where it is"
        ) from None
    except OSError as e:  # --download without a network (URLError), or an unwritable root
        reason = getattr(e, "reason", None) or e.strerror or type(e).__name__
        raise VitlabError(f"could not download {kind} into {root} ({reason}); check the network, "
                          "or pass --data-root DIR where the files already are") from None
    mean, std = dataset_stats(kind)
    return dataset, DatasetInfo(kind, list(dataset.classes), 32, mean, std)


_NAMED_FILES = 5  # unreadable files named in the warning
#: Image folders whose decoded pixels fit in this many bytes are kept in memory once decoded.
DECODED_CACHE_BYTES = 1 << 30
_warned_scans: set = set()  # folders already warned about in this process (train and val both ask)


def _imagefolder(path: str, cfg: DataConfig, split: str, seed: int,
                 progress: bool = False) -> tuple[Dataset, DatasetInfo]:
    """The ``split`` of the image folder ``path``: its ``train``/``val`` sub-folder if it has
    both, else a seeded class-balanced hold-out (:func:`holdout_indices`) of the whole folder.

    Bad files are handled rather than fatal:

    - every file is decoded once here (:func:`~vitlab.data.images.scan_images`); those that cannot be (damaged,
      truncated, not images) are left out, with one warning giving their number and the first
      few names, and if none can be read at all this raises :class:`VitlabError`;
    - greyscale, palette, CMYK, 16-bit and transparent images are converted to RGB on loading,
      transparency composited over white (:func:`~vitlab.data.images.to_rgb`);
    - images of another size than the data set's (the most common size in the folder, or
      ``cfg.image_size``) are resized and centre-cropped, image by image, by the transform.
    """
    from torchvision.datasets import ImageFolder

    root = Path(path).expanduser()
    if not root.is_dir():
        raise VitlabError(f"image folder '{root}' does not exist or is not a directory")
    has_splits = (root / "train").is_dir() and (root / "val").is_dir()
    scan_root = root / split if has_splits else root
    try:
        folder = ImageFolder(str(scan_root), loader=load_rgb)
    except FileNotFoundError as e:
        raise VitlabError(f"no images in '{root}': it needs one sub-folder of images per class ({e})") from None
    scan = scan_images(scan_root, [p for p, _ in folder.samples], progress)
    total = len(folder.samples)
    if len(scan.unreadable) == total:
        raise VitlabError(f"none of the {total} images in '{scan_root}' can be read (damaged files or not images)")
    if scan.unreadable:
        # Drop the unreadable files before any split is drawn, so train and val agree on them.
        bad = {os.path.join(str(scan_root), name) for name in scan.unreadable}
        folder.samples = [s for s in folder.samples if s[0] not in bad]
        folder.imgs, folder.targets = folder.samples, [t for _, t in folder.samples]
        if scan.key not in _warned_scans:  # once per process, though train and val both ask
            _warned_scans.add(scan.key)
            named = ", ".join(scan.unreadable[:_NAMED_FILES])
            more = f" and {len(scan.unreadable) - _NAMED_FILES} more" if len(scan.unreadable) > _NAMED_FILES else ""
            warnings.warn(f"skipped {len(scan.unreadable)} of {total} images in '{scan_root}' that cannot be "
                          f"read: {named}{more}", stacklevel=3)
    if sum(w * h * 3 * n for (w, h), n in scan.sizes.items()) <= DECODED_CACHE_BYTES:
        folder.loader = DecodedCache()  # small images: decode each file once, not once per epoch
    if has_splits:
        dataset: Dataset = folder
    else:
        dataset = Subset(folder, holdout_indices(folder.targets, cfg.val_fraction, seed, split))
    # The data set's native size is its most common one: a few odd files must not decide it.
    (width, height), _ = max(scan.sizes.items(), key=lambda item: item[1])
    native = width if width == height else None
    if native is None and not cfg.image_size:
        raise VitlabError(f"images in '{root}' are not square; choose a size with --image-size")
    return dataset, DatasetInfo(f"imagefolder:{root}", list(folder.classes), native or cfg.image_size)


def holdout_indices(targets: Sequence[int], fraction: float, seed: int, split: str) -> list[int]:
    """Indices of a seeded, class-balanced hold-out (``split="val"``) or of the rest (``"train"``).

    Each class gives up round(fraction x its size) images, chosen at random with ``seed``;
    the same seed always gives the same split.
    """
    if not 0 < fraction < 1:
        raise VitlabError(f"val_fraction must be between 0 and 1, not {fraction}")
    targets_t = torch.as_tensor(list(targets))
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in targets_t.unique().tolist():
        idx = (targets_t == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(fraction * len(idx))
        chosen.append(idx[:k] if split == "val" else idx[k:])
    return sorted(torch.cat(chosen).tolist())
