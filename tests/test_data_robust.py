"""Image folders as they come from the wild: damaged, truncated, odd-mode and odd-sized files."""

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from vitlab import VitlabError
from vitlab.data import DataConfig, build_dataset, datasets, images
from vitlab.data.transforms import FitSize

# The files the messy folder holds that cannot be decoded, in listing order (classes, then names).
UNREADABLE = [os.path.join("cat", "corrupt.png"), os.path.join("cat", "truncated.jpg"),
              os.path.join("dog", "corrupt.jpg")]
GOOD_PER_CLASS = 10
ODD_MODES = 6  # gray, palette, rgba (cat); cmyk, odd-sized, 16-bit (dog)
TOTAL = 2 * GOOD_PER_CLASS + ODD_MODES + len(UNREADABLE)
READABLE = TOTAL - len(UNREADABLE)


def _noise(rng, w=32, h=32) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _truncated_jpeg(rng) -> bytes:
    # Quality 100 makes the scan data long enough that half the file keeps the whole header:
    # Image.open succeeds and only decoding (load) fails, the case a size-only check misses.
    buf = io.BytesIO()
    _noise(rng).save(buf, "JPEG", quality=100)
    data = buf.getvalue()
    return data[: len(data) // 2]


def make_messy_folder(root: Path, seed: int = 0) -> Path:
    """Two classes of good 32x32 images plus one file of each bad kind."""
    rng = np.random.default_rng(seed)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(GOOD_PER_CLASS):
            _noise(rng).save(root / cls / (f"{i}.png" if i % 2 else f"{i}.jpg"))
    cat, dog = root / "cat", root / "dog"
    (cat / "corrupt.png").write_bytes(rng.bytes(600))
    (dog / "corrupt.jpg").write_bytes(rng.bytes(600))
    (cat / "truncated.jpg").write_bytes(_truncated_jpeg(rng))
    _noise(rng).convert("L").save(cat / "gray.png")
    _noise(rng).convert("P", palette=Image.Palette.ADAPTIVE).save(cat / "palette.png")
    rgba = _noise(rng).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)))
    rgba.save(cat / "rgba.png")
    _noise(rng).convert("CMYK").save(dog / "cmyk.jpg")
    _noise(rng, 37, 29).save(dog / "odd.png")
    Image.fromarray(rng.integers(0, 65536, (32, 32), dtype=np.uint16)).save(dog / "deep.png")
    return root


@pytest.fixture
def messy(tmp_path) -> Path:
    return make_messy_folder(tmp_path / "messy")


def _build_both(root: Path, **cfg_args):
    cfg = DataConfig(name=f"imagefolder:{root}", **cfg_args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, info = build_dataset(cfg, "train")
        val, _ = build_dataset(cfg, "val")
    return train, val, info, [str(w.message) for w in caught if "cannot be read" in str(w.message)]


def test_unreadable_files_are_skipped_with_one_warning(messy):
    train, val, info, messages = _build_both(messy)
    assert len(train) + len(val) == READABLE
    assert info.classes == ["cat", "dog"] and info.image_size == 32  # the most common size
    # one line, once, although train and val were both built
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0] == (f"skipped {len(UNREADABLE)} of {TOTAL} images in '{messy}' that cannot be read: "
                           + ", ".join(UNREADABLE))
    kept = {os.path.relpath(p, messy) for p, _ in train.dataset.base.samples}
    assert kept.isdisjoint(UNREADABLE) and len(kept) == READABLE


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_item_is_a_float_tensor_of_the_data_set_size(messy, split):
    train, val, _, _ = _build_both(messy)
    dataset = train if split == "train" else val
    for i in range(len(dataset)):
        x, y = dataset[i]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and torch.isfinite(x).all()
        assert y in (0, 1)
    images, labels = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    assert images.shape == (len(dataset), 3, 32, 32) and labels.shape == (len(dataset),)


def test_every_odd_file_collates_in_one_batch(messy):
    # No hold-out: the batch is sure to contain every odd-mode and odd-sized file.
    for name in UNREADABLE:
        (messy / name).unlink()
    (messy / "train").mkdir()
    (messy / "val").mkdir()
    for cls in ("cat", "dog"):
        (messy / cls).rename(messy / "train" / cls)
        (messy / "val" / cls).mkdir()
        _noise(np.random.default_rng(1)).save(messy / "val" / cls / "0.png")
    train, val, info, messages = _build_both(messy)
    assert len(train) == READABLE and len(val) == 2 and not messages
    # Without augmentation too: RandomCrop alone would hide a size mismatch.
    plain, _ = build_dataset(DataConfig(name=f"imagefolder:{messy}"), "train", train_transform=False)
    for dataset in (train, plain):
        images, _ = next(iter(DataLoader(dataset, batch_size=len(dataset))))
        assert images.shape == (READABLE, 3, 32, 32)


def test_train_and_val_sub_folders_each_skip_their_bad_files(tmp_path):
    root = tmp_path / "split"
    make_messy_folder(root / "train", seed=0)
    make_messy_folder(root / "val", seed=1)
    train, val, _, messages = _build_both(root)
    assert len(train) == len(val) == READABLE
    assert len(messages) == 2
    assert any(f"'{root / 'train'}'" in m for m in messages) and any(f"'{root / 'val'}'" in m for m in messages)


def test_a_long_list_of_unreadable_files_is_cut_short(tmp_path):
    root = tmp_path / "many"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        _noise(rng).save(root / "a" / f"good{i}.png")
    for i in range(8):
        (root / "a" / f"bad{i}.jpg").write_bytes(rng.bytes(100))
    _, _, _, messages = _build_both(root, image_size=32)
    assert len(messages) == 1
    assert messages[0].startswith(f"skipped 8 of 18 images in '{root}' that cannot be read: ")
    assert messages[0].endswith(", ".join(os.path.join("a", f"bad{i}.jpg") for i in range(5)) + " and 3 more")


def test_a_dangling_link_is_one_more_unreadable_file(messy):
    (messy / "dog" / "gone.png").symlink_to(messy / "nowhere.png")
    _, _, _, messages = _build_both(messy)
    assert messages[0].startswith(f"skipped {len(UNREADABLE) + 1} of {TOTAL + 1} images")
    assert os.path.join("dog", "gone.png") in messages[0]


def test_the_scan_shows_a_progress_bar_when_asked(messy, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_dataset(DataConfig(name=f"imagefolder:{messy}"), "train", progress=True)
    assert f"checking {TOTAL} images" in capsys.readouterr().err


def test_a_folder_of_only_unreadable_files_is_an_error(tmp_path):
    root = tmp_path / "junk"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(os.urandom(64))
    with pytest.raises(VitlabError, match="can be read") as err:
        build_dataset(DataConfig(name=f"imagefolder:{root}"), "train")
    message = str(err.value)
    assert f"'{root}'" in message and "6 images" in message and "\n" not in message


def test_truncated_images_are_found_even_if_pillow_is_told_to_tolerate_them(messy, monkeypatch):
    # Some libraries switch this on globally; the scan must not let half-decoded JPEGs through.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    train, val, _, messages = _build_both(messy)
    assert len(train) + len(val) == READABLE and os.path.join("cat", "truncated.jpg") in messages[0]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_existing_errors_are_kept(tmp_path):
    with pytest.raises(VitlabError, match="does not exist"):
        build_dataset(DataConfig(name=f"imagefolder:{tmp_path / 'nope'}"), "train")
    with pytest.raises(VitlabError, match="no images"):
        build_dataset(DataConfig(name=f"imagefolder:{tmp_path}"), "train")
    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        _noise(rng, 40, 30).save(tmp_path / "a" / f"{i}.png")
    _noise(rng).save(tmp_path / "a" / "square.png")  # one square file does not make the set square
    with pytest.raises(VitlabError, match="not square"):
        build_dataset(DataConfig(name=f"imagefolder:{tmp_path}"), "train")
    dataset, info = build_dataset(DataConfig(name=f"imagefolder:{tmp_path}", image_size=24), "train",
                                  train_transform=False)
    assert info.image_size == 24 and dataset[0][0].shape == (3, 24, 24)


def test_train_and_val_share_one_scan(messy, monkeypatch):
    calls = []
    decode = images._decode_all
    monkeypatch.setattr(images, "_decode_all", lambda *a, **k: calls.append(1) or decode(*a, **k))
    _build_both(messy)
    assert len(calls) == 1


def test_large_folders_keep_their_scan_on_disk(messy, monkeypatch, tmp_path):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(images, "_SCAN_CACHE_MIN_FILES", 1)
    monkeypatch.setattr(images, "_scans", {})
    _build_both(messy)
    assert len(list((tmp_path / "cache" / "imagefolder-scans").glob("*.json"))) == 1

    # A new process (empty in-memory cache) reuses the saved scan without decoding anything...
    monkeypatch.setattr(images, "_scans", {})
    monkeypatch.setattr(datasets, "_warned_scans", set())

    def no_decoding(*args, **kwargs):
        raise AssertionError("the saved scan should have been used")

    monkeypatch.setattr(images, "_decode_all", no_decoding)
    train, val, _, messages = _build_both(messy)
    assert len(train) + len(val) == READABLE and len(messages) == 1  # and still says what it skipped

    # ... until the folder changes: a new (damaged) file means scanning again.
    monkeypatch.undo()
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(images, "_SCAN_CACHE_MIN_FILES", 1)
    (messy / "dog" / "new.png").write_bytes(b"not an image")
    train, val, _, messages = _build_both(messy)
    assert len(train) + len(val) == READABLE and f"skipped {len(UNREADABLE) + 1} of {TOTAL + 1}" in messages[0]


def test_modes_are_converted_to_rgb():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # invisible black: shown as white
    assert images.to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert images.to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    deep = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # 16-bit mid-grey, not clipped white
    assert deep.mode.startswith("I") and images.to_rgb(deep).getpixel((0, 0)) == (128, 128, 128)
    for mode in ("L", "P", "CMYK", "1", "LA"):
        assert images.to_rgb(Image.new("RGB", (4, 4), (10, 200, 30)).convert(mode)).mode == "RGB"
    rgb = Image.new("RGB", (4, 4))
    assert images.to_rgb(rgb) is rgb


def test_fit_size_resizes_only_images_of_another_size():
    fit = FitSize(32)
    same = Image.new("RGB", (32, 32))
    assert fit(same) is same  # the fast path: no resampling at all
    assert fit(Image.new("RGB", (37, 29))).size == (32, 32)
    assert fit(Image.new("RGB", (16, 16))).size == (32, 32)


def test_training_runs_on_a_messy_folder(messy, tmp_path):
    from vitlab.train import TrainConfig, train

    cfg = TrainConfig.from_dict(dict(model="resnet20_cifar", epochs=1, batch_size=8,
                                     data=DataConfig(name=f"imagefolder:{messy}")))
    with pytest.warns(UserWarning, match="skipped 3 of"):
        result = train(cfg, tmp_path / "run", progress=False)
    assert len(result.metrics) == 1 and np.isfinite(result.metrics[0]["train_loss"])
    assert result.info.image_size == 32 and result.info.num_classes == 2
