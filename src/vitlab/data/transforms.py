"""Augmentation presets for small images.

``crop-flip`` is the classic CIFAR recipe (pad by 1/8 of the side, random crop back, horizontal
flip). RandAugment is timm's, switched on by its config string (e.g. ``rand-m9-mstd0.5``, the
CCT recipe's). Evaluation only resizes (if needed) and normalises.
"""

from __future__ import annotations

from typing import Callable, Sequence

from timm.data import rand_augment_transform
from torchvision import transforms as T

from ..errors import VitlabError

AUGMENTATIONS = ("none", "crop-flip")


def build_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    augment: str = "crop-flip",
    randaugment: str | None = None,
    native_size: int | None = None,
    normalize: bool = True,
) -> Callable:
    """The transform from a PIL image to a normalised float tensor (3, image_size, image_size).

    ``native_size`` is the side the images are stored at; when it differs from ``image_size``
    they are resized first (evaluation uses a resize then centre crop of the same size).
    ``normalize=False`` leaves pixels in [0, 1] (analyses normalise per model).
    """
    if augment not in AUGMENTATIONS:
        raise VitlabError(f"unknown augmentation '{augment}'; choose one of {', '.join(AUGMENTATIONS)}")
    steps: list[Callable] = []
    if native_size != image_size:
        steps += [T.Resize(image_size), T.CenterCrop(image_size)]
    if train and augment == "crop-flip":
        steps += [T.RandomCrop(image_size, padding=max(image_size // 8, 1)), T.RandomHorizontalFlip()]
    if train and randaugment:
        if not randaugment.startswith("rand"):
            raise VitlabError(f"RandAugment config '{randaugment}' must look like 'rand-m9-mstd0.5' (timm's format)")
        hparams = dict(translate_const=int(image_size * 0.45), img_mean=tuple(round(255 * m) for m in mean))
        try:
            steps.append(rand_augment_transform(randaugment, hparams))
        except (AssertionError, ValueError, KeyError) as e:
            raise VitlabError(f"bad RandAugment config '{randaugment}' ({e}); use timm's format, e.g. 'rand-m9-mstd0.5'") from None
    steps.append(T.ToTensor())
    if normalize:
        steps.append(T.Normalize(mean, std))
    return T.Compose(steps)
