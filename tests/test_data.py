"""Data: the embedded shapes set (determinism, labels, masks, textures), folders, CIFAR, errors."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab import VitlabError
from vitlab.data import (
    SHAPE_CLASSES,
    DataConfig,
    ShapesConfig,
    build_dataset,
    holdout_indices,
    load_shapes,
    render_shapes,
)

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train"


def test_shapes_are_deterministic_and_seed_dependent():
    a = render_shapes(ShapesConfig(num_images=64, seed=3))
    b = render_shapes(ShapesConfig(num_images=64, seed=3))
    c = render_shapes(ShapesConfig(num_images=64, seed=4))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)


def test_shapes_shapes_and_balance():
    arr = render_shapes(ShapesConfig(num_images=200, image_size=48))
    assert arr.images.shape == (200, 3, 48, 48) and arr.images.dtype == torch.uint8
    assert arr.masks.shape == (200, 48, 48) and arr.masks.dtype == torch.bool
    assert arr.labels.bincount(minlength=10).tolist() == [20] * 10
    # every object is visible and smaller than the image
    coverage = arr.masks.float().mean((1, 2))
    assert coverage.min() > 0.03 and coverage.max() < 0.8


def test_object_differs_from_background_inside_the_mask():
    arr = render_shapes(ShapesConfig(num_images=100, pixel_noise=0.0))
    img = arr.images.float() / 255
    lum = img.mean(1)
    inside = (lum * arr.masks).sum((1, 2)) / arr.masks.sum((1, 2))
    outside = (lum * ~arr.masks).sum((1, 2)) / (~arr.masks).sum((1, 2))
    # the palette keeps object and background apart in brightness (textures blur it a little)
    assert ((inside - outside).abs() > 0.15).float().mean() > 0.95


@pytest.mark.parametrize("mode", ["random", "match", "conflict"])
def test_texture_modes(mode):
    arr = render_shapes(ShapesConfig(num_images=300, texture_mode=mode))
    same = (arr.textures == arr.labels).float().mean().item()
    if mode == "match":
        assert same == 1.0
    elif mode == "conflict":
        assert same == 0.0
    else:
        assert 0.02 < same < 0.25  # chance is 1/10
    assert (arr.background_textures != arr.textures).all()


def test_shapes_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path))
    cfg = ShapesConfig(num_images=32, seed=9)
    first = load_shapes(cfg)
    files = list((tmp_path / "shapes").glob("*.npz"))
    assert len(files) == 1
    second = load_shapes(cfg)
    assert torch.equal(first.images, second.images) and torch.equal(first.textures, second.textures)
    files[0].write_bytes(b"damaged")  # a broken cache file is re-rendered, not fatal
    assert torch.equal(load_shapes(cfg).images, first.images)


def test_shapes_dataset_train_and_val_differ_and_normalise():
    cfg = DataConfig(num_train=40, num_val=20)
    train, info = build_dataset(cfg, "train")
    val, _ = build_dataset(cfg, "val")
    assert info.classes == list(SHAPE_CLASSES) and info.num_classes == 10 and info.image_size == 32
    assert len(train) == 40 and len(val) == 20
    x, y = val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1.01 <= x.min() and x.max() <= 1.01
    assert not np.array_equal(train.images[:20], val.images)
    raw, _ = build_dataset(cfg, "val", normalize=False)
    assert 0 <= raw[0][0].min() and raw[0][0].max() <= 1


def test_empty_shapes_split_is_refused():
    with pytest.raises(VitlabError, match="the shapes split is empty"):
        build_dataset(DataConfig(num_train=0), "train")


def test_unknown_dataset_suggests_names():
    with pytest.raises(VitlabError, match=r"unknown data set 'cifar1O'.*cifar10"):
        build_dataset(DataConfig(name="cifar1O"), "train")


def test_cifar_offline_names_the_fix(tmp_path):
    with pytest.raises(VitlabError, match=r"cifar10 is not in .*--download"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "train")


def _make_folder(root: Path, classes=("cat", "dog"), per_class=10, size=16):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_holds_out_a_balanced_split(tmp_path):
    _make_folder(tmp_path, per_class=10)
    cfg = DataConfig(name=f"imagefolder:{tmp_path}", val_fraction=0.2, image_size=32)
    train, info = build_dataset(cfg, "train")
    val, _ = build_dataset(cfg, "val")
    assert info.classes == ["cat", "dog"] and len(train) == 16 and len(val) == 4
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(val.dataset.base.targets[i] for i in val.indices) == [0, 0, 1, 1]
    assert train[0][0].shape == (3, 32, 32)  # resized from 16 px


def test_holdout_is_seeded():
    targets = [i % 3 for i in range(30)]
    assert holdout_indices(targets, 0.2, 0, "val") == holdout_indices(targets, 0.2, 0, "val")
    assert holdout_indices(targets, 0.2, 0, "val") != holdout_indices(targets, 0.2, 1, "val")
    val, train = holdout_indices(targets, 0.2, 0, "val"), holdout_indices(targets, 0.2, 0, "train")
    assert sorted(val + train) == list(range(30))


def test_empty_or_missing_image_folder(tmp_path):
    with pytest.raises(VitlabError, match="does not exist"):
        build_dataset(DataConfig(name=f"imagefolder:{tmp_path / 'nope'}"), "train")
    with pytest.raises(VitlabError, match="no images"):
        build_dataset(DataConfig(name=f"imagefolder:{tmp_path}"), "train")


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="shared CIFAR-10 folder not present")
def test_imagefolder_on_shared_cifar10():
    cfg = DataConfig(name=f"imagefolder:{SHARED_CIFAR}")
    val, info = build_dataset(cfg, "val")
    assert info.num_classes == 10 and info.image_size == 32
    assert len(val) == 5000  # 10% of each class of 50,000
    x, y = val[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10


def test_randaugment_option_adds_timm_randaugment_to_training_only():
    from timm.data.auto_augment import RandAugment

    from vitlab.data.transforms import build_transform

    train_t = build_transform(32, (0.5,) * 3, (0.5,) * 3, train=True, randaugment="rand-m9-mstd0.5")
    eval_t = build_transform(32, (0.5,) * 3, (0.5,) * 3, train=False, randaugment="rand-m9-mstd0.5")
    assert sum(isinstance(t, RandAugment) for t in train_t.transforms) == 1
    assert not any(isinstance(t, RandAugment) for t in eval_t.transforms)
    assert train_t(Image.new("RGB", (32, 32), (128, 64, 32))).shape == (3, 32, 32)
    with pytest.raises(VitlabError, match="must look like 'rand-m9-mstd0.5'"):
        build_transform(32, (0.5,) * 3, (0.5,) * 3, train=True, randaugment="m9")


@pytest.mark.parametrize("normalize", [True, False])  # the fast numpy path and torchvision's
@pytest.mark.parametrize("pad", [0, 2])
def test_crop_padding_bounds_the_shift_of_crop_flip(pad, normalize):
    from vitlab.data import build_transform

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    transform = build_transform(12, mean, std, train=True, augment="crop-flip", normalize=normalize, crop_padding=pad)
    padded = np.zeros((12 + 2 * pad, 12 + 2 * pad, 3), dtype=np.uint8)
    padded[pad:pad + 12, pad:pad + 12] = pixels
    # Every (shift, flip) the padding allows, as the transform's output would be.
    candidates = {}
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            for flip in (False, True):
                crop = padded[top:top + 12, left:left + 12]
                crop = crop[:, ::-1] if flip else crop
                x = torch.from_numpy(crop.transpose(2, 0, 1).astype(np.float32) / 255)
                if normalize:
                    x = (x - 0.5) / 0.25
                candidates[(top - pad, left - pad, flip)] = x
    seen = set()
    torch.manual_seed(0)
    for _ in range(200):
        out = transform(Image.fromarray(pixels))
        match = [key for key, x in candidates.items() if torch.allclose(out, x, atol=1e-5)]
        assert match, "an output no allowed shift and flip explains"
        seen.add(match[0])
    assert max(max(abs(dy), abs(dx)) for dy, dx, _ in seen) == pad  # the whole range is used
    assert {flip for _, _, flip in seen} == {False, True}


def test_crop_padding_as_large_as_the_image_is_refused():
    from vitlab.data import build_transform

    with pytest.raises(VitlabError, match="crop_padding"):
        build_transform(8, (0.5,) * 3, (0.5,) * 3, train=True, crop_padding=8)


def test_split_seed_fixes_the_validation_split_across_run_seeds(tmp_path):
    _make_folder(tmp_path, per_class=10)
    cfg = DataConfig(name=f"imagefolder:{tmp_path}", val_fraction=0.2, image_size=32)
    val_of = {seed: build_dataset(cfg, "val", seed=seed)[0].indices for seed in (0, 1)}
    assert val_of[0] != val_of[1]  # without it, the hold-out follows the run's seed
    fixed = replace(cfg, split_seed=0)
    assert build_dataset(fixed, "val", seed=1)[0].indices == val_of[0]
    assert set(build_dataset(fixed, "train", seed=1)[0].indices).isdisjoint(val_of[0])
    # shapes: the validation images are the split seed's, the training images still the run's
    shapes = DataConfig(num_train=8, num_val=8, split_seed=0)
    assert torch.equal(build_dataset(shapes, "val", seed=3)[0][0][0], build_dataset(shapes, "val", seed=0)[0][0][0])
    assert not torch.equal(build_dataset(shapes, "train", seed=3, train_transform=False)[0][0][0],
                           build_dataset(shapes, "train", seed=0, train_transform=False)[0][0][0])
