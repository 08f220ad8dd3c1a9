"""Augmentation presets for small images.

``crop-flip`` is the classic CIFAR recipe (pad by 1/8 of the side, random crop back, horizontal
flip); ``resized-crop-flip`` takes a random crop of ``crop_scale``-1 of the area at an aspect ratio
of 3/4-4/3, resized back, and flips (the CCT recipe's, with scale 0.8-1). RandAugment is timm's, switched on by its
config string (e.g. ``rand-m9-mstd0.5``, the CCT recipe's). Evaluation only resizes (if needed) and normalises.

Every transform starts with :class:`FitSize`: an image whose size differs from the target is
resized (shorter side) and centre-cropped to it, one image at a time, so a folder with a few
odd-sized files still collates into batches; images already at the target size pass untouched.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import rand_augment_transform
from torchvision import transforms as T

from ..errors import VitlabError

AUGMENTATIONS = ("none", "crop-flip", "resized-crop-flip")


class FitSize:
    """Resize (shorter side) and centre-crop a PIL image to ``size`` x ``size``, if it is not already.

    Deciding per image, not per data set, is what lets one odd-sized file live among the others;
    images already at the target size skip the resampling entirely (the common, fast path).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._resize = T.Compose([T.Resize(size), T.CenterCrop(size)])

    def __call__(self, image: Image.Image) -> Image.Image:
        """``image`` itself if it is ``size`` x ``size``, else resized and centre-cropped to that."""
        if image.size == (self.size, self.size):
            return image
        return self._resize(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class PadCropFlip:
    """``crop-flip`` of a PIL image into a normalised float tensor in one numpy pass.

    The same augmentation as torchvision's ``RandomCrop(size, padding=pad)`` (zero padding) then
    ``RandomHorizontalFlip()``, then ``ToTensor()`` and ``Normalize``, at a fifth of the cost
    (about 50 us instead of 260 us for a 32x32 image): on a 2-core machine the data loader
    otherwise takes a fifth of the CPU from training. Offsets and flip come from torch's
    generator, which :class:`~vitlab.data.sampling.SeededDataset` seeds per sample.
    """

    def __init__(self, size: int, pad: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.pad = size, pad
        self.scale = (1 / (255 * np.asarray(std, dtype=np.float32)))[:, None, None]
        self.shift = (np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32))[:, None, None]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """``image`` zero-padded, randomly cropped, maybe flipped and normalised: a float tensor (C, size, size)."""
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[..., None].repeat(3, axis=2)
        h, w = pixels.shape[:2]
        padded = np.zeros((h + 2 * self.pad, w + 2 * self.pad, pixels.shape[2]), dtype=np.uint8)
        padded[self.pad:self.pad + h, self.pad:self.pad + w] = pixels
        top = int(torch.randint(0, padded.shape[0] - self.size + 1, (1,)))
        left = int(torch.randint(0, padded.shape[1] - self.size + 1, (1,)))
        crop = padded[top:top + self.size, left:left + self.size]
        if torch.rand(1) < 0.5:
            crop = crop[:, ::-1]
        chw = crop.transpose(2, 0, 1).astype(np.float32)
        return torch.from_numpy(chw * self.scale - self.shift)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, pad={self.pad})"


def build_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    augment: str = "crop-flip",
    randaugment: str | None = None,
    native_size: int | None = None,
    normalize: bool = True,
    crop_scale: float = 0.8,
    crop_padding: int | None = None,
) -> Callable:
    """The transform from a PIL image to a normalised float tensor (3, image_size, image_size).

    Images whose size is not ``image_size`` x ``image_size`` are resized (shorter side) and
    centre-cropped first, each on its own (:class:`FitSize`), so mixed sizes still collate.
    ``native_size`` (the side most images are stored at) is accepted for compatibility only:
    resizing is decided per image, since one odd file must not break a batch.
    ``normalize=False`` leaves pixels in [0, 1] (analyses normalise per model). ``crop_scale``
    is the smallest fraction of the area ``resized-crop-flip`` keeps; ``crop_padding`` the pixels
    ``crop-flip`` pads each side with before its random crop (``None``: an eighth of the side).
    """
    if augment not in AUGMENTATIONS:
        raise VitlabError(f"unknown augmentation '{augment}'; choose one of {', '.join(AUGMENTATIONS)}")
    steps: list[Callable] = [FitSize(image_size)]
    if randaugment in ("none", ""):  # how a command line turns a recipe's RandAugment off
        randaugment = None
    pad = max(image_size // 8, 1) if crop_padding is None else crop_padding
    if not 0 <= pad < image_size:
        raise VitlabError(f"crop_padding must be 0 or more and less than the image size {image_size}, not {pad}")
    if train and augment == "crop-flip" and not randaugment and normalize:  # the common case, fast
        return T.Compose(steps + [PadCropFlip(image_size, pad, mean, std)])
    if train and augment == "crop-flip":
        steps += [T.RandomCrop(image_size, padding=pad), T.RandomHorizontalFlip()]
    if train and augment == "resized-crop-flip":
        if not 0 < crop_scale <= 1:
            raise VitlabError(f"crop_scale must be in (0, 1], not {crop_scale}")
        steps += [T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), antialias=True), T.RandomHorizontalFlip()]
    if train and randaugment:
        if not randaugment.startswith("rand"):
            raise VitlabError(f"RandAugment config '{randaugment}' must look like 'rand-m9-mstd0.5' (timm's format)")
        hparams = dict(translate_const=int(image_size * 0.45), img_mean=tuple(round(255 * m) for m in mean))
        try:
            steps.append(rand_augment_transform(randaugment, hparams))
        except (AssertionError, ValueError, KeyError) as e:
            raise VitlabError(f"bad RandAugment config '{randaugment}' ({e}); "
                              "use timm's format, e.g. 'rand-m9-mstd0.5'") from None
    steps.append(T.ToTensor())
    if normalize:
        steps.append(T.Normalize(mean, std))
    return T.Compose(steps)
