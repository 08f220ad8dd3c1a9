"""Property tests (hypothesis): seeded batches, transforms, shapes rendering and the config loader.

Each property holds for every input hypothesis draws; example counts are kept small so the
whole file runs in well under a minute on two CPU cores.
"""

import dataclasses
import functools
import types
import typing

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from vitlab import VitlabError
from vitlab.config import Accel, Checkpoints, DataConfig, Optim, TrainConfig, dump_config, load_config
from vitlab.data import ShapesConfig, build_transform, render_shapes
from vitlab.data.sampling import SeededBatches, SeededDataset
from vitlab.data.shapes import TEXTURE_MODES
from vitlab.models import list_models
from vitlab.options import valid_keys

# conftest flushes denormals to zero (as the vitlab command does), so hypothesis must not draw them.
floats = functools.partial(st.floats, allow_subnormal=False)

FAST = settings(max_examples=100, deadline=None)
# Rendering and transforms cost milliseconds per example: fewer of them.
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- seeded batches ---------------------------------------------------------------------------


@st.composite
def batch_layouts(draw):
    """(num_samples, batch_size, world_size) with world_size dividing batch_size <= num_samples."""
    world_size = draw(st.sampled_from([1, 2, 3, 4]))
    batch_size = world_size * draw(st.integers(1, 8))
    num_samples = draw(st.integers(batch_size, 120))
    return num_samples, batch_size, world_size


def _epoch(num_samples, batch_size, seed, epoch=0, **kwargs):
    return list(SeededBatches(num_samples, batch_size, seed, epoch=epoch, **kwargs))


@FAST
@given(batch_layouts(), st.integers(0, 2**40), st.integers(0, 50))
def test_an_epoch_uses_each_index_at_most_once(layout, seed, epoch):
    num_samples, batch_size, _ = layout
    batches = _epoch(num_samples, batch_size, seed, epoch)
    sampler = SeededBatches(num_samples, batch_size, seed, epoch=epoch)
    indices = [i for batch in batches for i, _ in batch]
    assert len(batches) == sampler.steps_per_epoch == num_samples // batch_size
    assert all(len(batch) == batch_size for batch in batches)
    assert len(indices) == sampler.steps_per_epoch * batch_size
    assert len(set(indices)) == len(indices) and all(0 <= i < num_samples for i in indices)


@FAST
@given(batch_layouts(), st.integers(0, 2**40), st.integers(0, 50), st.data())
def test_resuming_mid_epoch_yields_the_tail_of_the_epoch(layout, seed, epoch, data):
    num_samples, batch_size, _ = layout
    full = _epoch(num_samples, batch_size, seed, epoch)
    start = data.draw(st.integers(0, len(full)), label="start_step")
    resumed = SeededBatches(num_samples, batch_size, seed, epoch=epoch, start_step=start)
    assert len(resumed) == len(full) - start
    assert list(resumed) == full[start:]  # same indices *and* the same per-sample seeds


@FAST
@given(batch_layouts(), st.integers(0, 2**40), st.integers(0, 50))
def test_rank_shares_make_up_the_single_process_batch(layout, seed, epoch):
    num_samples, batch_size, world_size = layout
    single = _epoch(num_samples, batch_size, seed, epoch)
    ranks = [_epoch(num_samples, batch_size, seed, epoch, rank=r, world_size=world_size) for r in range(world_size)]
    for step, batch in enumerate(single):
        shares = [ranks[r][step] for r in range(world_size)]
        assert all(len(share) == batch_size // world_size for share in shares)
        assert [item for share in shares for item in share] == batch


@FAST
@given(st.integers(10, 200), st.integers(0, 2**40), st.integers(0, 1000))
def test_epochs_are_shuffled_differently(num_samples, seed, epoch):
    first = [i for b in _epoch(num_samples, 1, seed, epoch) for i, _ in b]
    second = [i for b in _epoch(num_samples, 1, seed, epoch + 1) for i, _ in b]
    # 10! orders: equal permutations of >= 10 items from independent seeds would be a bug.
    assert first != second


# --- transforms ---------------------------------------------------------------------------------

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


@st.composite
def rgb_images(draw, max_side=72):
    w, h = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


transform_options = st.fixed_dictionaries({
    "image_size": st.integers(8, 48),
    "train": st.booleans(),
    "augment": st.sampled_from(["none", "crop-flip"]),
    "randaugment": st.sampled_from([None, "rand-m9-mstd0.5"]),
    "native_size": st.one_of(st.none(), st.integers(8, 64)),
})


@SLOW
@given(rgb_images(), transform_options)
def test_any_image_becomes_a_finite_tensor_of_the_asked_size(image, options):
    transform = build_transform(mean=MEAN, std=STD, **options)
    x = transform(image)
    size = options["image_size"]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert x.shape == (3, size, size) and torch.isfinite(x).all()


class _Images(torch.utils.data.Dataset):
    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), index


@SLOW
@given(st.lists(rgb_images(max_side=40), min_size=1, max_size=3), st.integers(16, 32),
       st.sampled_from([None, "rand-m9-mstd0.5"]), st.integers(0, 2**62), st.data())
def test_seeded_dataset_repeats_for_a_seed_and_varies_across_seeds(images, size, randaugment, seed, data):
    transform = build_transform(size, MEAN, STD, train=True, augment="crop-flip", randaugment=randaugment)
    dataset = SeededDataset(_Images(images, transform))
    index = data.draw(st.integers(0, len(images) - 1), label="index")
    a, b = dataset[(index, seed)], dataset[(index, seed)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] == index
    # Two seeds may by chance pick the same crop and flip (one in a few hundred), eight all alike
    # only if the seed is ignored.
    outputs = [dataset[(index, seed + k)][0] for k in range(1, 9)]
    assert any(not torch.equal(outputs[0], x) for x in outputs[1:])


# --- shapes ---------------------------------------------------------------------------------------


@SLOW
@given(st.integers(1, 24), st.integers(8, 40), st.integers(0, 2**31), st.sampled_from(TEXTURE_MODES))
def test_shapes_are_valid_and_reproducible(num_images, image_size, seed, texture_mode):
    cfg = ShapesConfig(num_images=num_images, image_size=image_size, seed=seed, texture_mode=texture_mode)
    arr = render_shapes(cfg)
    assert arr.images.dtype == torch.uint8 and arr.images.shape == (num_images, 3, image_size, image_size)
    assert arr.labels.shape == (num_images,) and ((0 <= arr.labels) & (arr.labels < 10)).all()
    assert ((0 <= arr.textures) & (arr.textures < 10)).all()
    assert arr.masks.dtype == torch.bool and arr.masks.shape == (num_images, image_size, image_size)
    assert arr.masks.flatten(1).any(1).all(), "every image shows its object"
    again = render_shapes(cfg)
    for name in ("images", "labels", "masks", "textures", "background_textures"):
        assert torch.equal(getattr(arr, name), getattr(again, name))


# --- config loader --------------------------------------------------------------------------------

MODELS = sorted(list_models())
# Any text but lone surrogates (which no UTF-8 file can hold), control characters included.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
positive = floats(min_value=1e-9, max_value=1e3, allow_nan=False, allow_infinity=False)
non_negative = floats(min_value=0.0, max_value=1e3, allow_nan=False, allow_infinity=False)

data_configs = st.builds(
    DataConfig,
    name=st.one_of(st.sampled_from(["shapes", "cifar10", "cifar100"]), TEXT.filter(bool).map("imagefolder:{}".format)),
    image_size=st.one_of(st.none(), st.integers(8, 512)),
    root=st.one_of(st.none(), TEXT),
    download=st.booleans(),
    num_train=st.integers(1, 10**6),
    num_val=st.integers(1, 10**5),
    texture_mode=st.sampled_from(TEXTURE_MODES),
    val_fraction=floats(0.01, 0.99),
    augment=st.sampled_from(["none", "crop-flip"]),
    randaugment=st.sampled_from([None, "rand-m9-mstd0.5", "rand-m7-n2"]),
    num_workers=st.integers(0, 16),
)

train_configs = st.builds(
    TrainConfig,
    model=st.sampled_from(MODELS),
    model_args=st.dictionaries(st.sampled_from(["depth", "embed_dim", "num_heads"]), st.integers(1, 12), max_size=2),
    data=data_configs,
    epochs=st.integers(1, 10**4),
    batch_size=st.integers(1, 4096),
    optim=st.builds(Optim, lr=positive, min_lr=non_negative, weight_decay=non_negative, warmup_epochs=non_negative,
                    warmup_lr=non_negative, grad_clip=st.one_of(st.none(), positive)),
    label_smoothing=floats(0.0, 1.0, exclude_max=True),
    drop_path=floats(0.0, 0.9),
    init_weights=st.one_of(st.none(), TEXT),
    seed=st.integers(-(2**63), 2**63 - 1),
    eval_batch_size=st.integers(1, 4096),
    checkpoint=st.builds(Checkpoints, every=st.integers(0, 10**6), keep=st.integers(1, 100)),
    accel=st.builds(Accel, precision=st.sampled_from(["fp32", "bf16", "auto"]), compile=st.booleans(),
                    channels_last=st.sampled_from(["auto", "on", "off"]),
                    device=st.sampled_from(["auto", "cpu", "cuda"])),
)


def _config_file(tmp_path_factory):
    # One file rewritten by every example: a fresh directory each would be hundreds of them.
    return tmp_path_factory.getbasetemp() / "property-config.yaml"


@FAST
@given(train_configs)
def test_any_valid_config_round_trips_through_yaml(tmp_path_factory, cfg):
    cfg.validate()  # the strategy only draws valid configs
    path = _config_file(tmp_path_factory)
    path.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(path) == cfg
    assert TrainConfig.from_dict(yaml.safe_load(dump_config(cfg))) == cfg


TRAIN_FIELDS = set(valid_keys(TrainConfig))  # field names and every nested option's key
DATA_FIELDS = {f.name for f in dataclasses.fields(DataConfig)}


@FAST
@given(st.one_of(TEXT, st.integers(), st.none(), floats(allow_nan=False)), st.booleans(), st.integers(0, 10))
def test_an_unknown_key_is_refused_naming_the_valid_ones(key, in_data_section, value):
    assume(key not in TRAIN_FIELDS | DATA_FIELDS)
    values = {"data": {key: value}} if in_data_section else {key: value}
    with pytest.raises(VitlabError, match="valid keys"):
        TrainConfig.from_dict(values)


def _wrong_values(hint_kind: str):
    """Values that are not of the field's kind (and not None, which optional fields accept)."""
    texts = TEXT
    lists = st.lists(st.integers(), max_size=3)
    mappings = st.dictionaries(TEXT, st.integers(), min_size=1, max_size=2)
    others = {
        "int": st.one_of(texts, lists, mappings, st.booleans(), floats()),  # 3.0 is no integer either
        "float": st.one_of(texts, lists, mappings, st.booleans()),
        "str": st.one_of(st.integers(), floats(), lists, mappings, st.booleans()),
        "bool": st.one_of(st.integers(), texts, lists, mappings),
        "dict": st.one_of(st.integers(), texts, lists, st.booleans()),
    }
    return others[hint_kind]


def _kinds(config_class) -> dict[str, str]:
    """Each field of ``config_class`` with the kind of value it holds (optional ones: when set),
    read from the type hints so that fields added later are covered too."""
    kinds = {}
    for name, hint in typing.get_type_hints(config_class).items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        members = [t for t in (typing.get_args(hint) if union else (hint,)) if t is not type(None)]
        base = typing.get_origin(members[0]) or members[0]  # dict[str, Any] -> dict
        if base in (bool, int, float, str, dict):
            kinds[name] = base.__name__
    return kinds


_KINDS = {**{("top", k): v for k, v in _kinds(TrainConfig).items()},
          **{("data", k): v for k, v in _kinds(DataConfig).items()}}


@st.composite
def wrongly_typed(draw):
    section, name = draw(st.sampled_from(sorted(_KINDS)))
    value = draw(_wrong_values(_KINDS[section, name]), label=f"{section}.{name}")
    return ({"data": {name: value}} if section == "data" else {name: value}), name


@FAST
@given(wrongly_typed(), st.booleans())
def test_a_value_of_the_wrong_type_is_a_vitlab_error(tmp_path_factory, case, through_yaml):
    values, name = case
    if through_yaml:
        path = _config_file(tmp_path_factory)
        path.write_text(yaml.safe_dump(values), encoding="utf-8")
        load = lambda: load_config(path)  # noqa: E731
    else:
        load = lambda: TrainConfig.from_dict(values)  # noqa: E731
    # Only VitlabError may escape: pytest.raises lets any other exception fail the test.
    with pytest.raises(VitlabError, match=f"'{name}'"):
        load()


@FAST
@given(st.one_of(st.none(), st.booleans(), st.integers(), TEXT, st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.one_of(TEXT, st.integers(), st.none()), st.integers(), max_size=3)))
def test_any_data_section_or_yaml_document_is_handled(tmp_path_factory, value):
    # Whatever a YAML file holds, loading it gives a config or a VitlabError, nothing else.
    path = _config_file(tmp_path_factory)
    path.write_text(yaml.safe_dump({"data": value}), encoding="utf-8")
    for load in (lambda: load_config(path), lambda: TrainConfig.from_dict({"data": value})):
        try:
            cfg = load()
        except VitlabError:
            continue
        assert value in (None, {}) and cfg.data == DataConfig()  # only "no data section" may load


@FAST
@given(st.one_of(st.binary(max_size=64), TEXT.map(str.encode),
                 st.sampled_from([b"epochs: \xff\xfe\n", b"\xef\xbb\xbfepochs: 2\n", b"- 1\n- 2\n", b"1: 2\n"])))
def test_any_bytes_in_a_config_file_give_a_config_or_a_vitlab_error(tmp_path_factory, blob):
    path = _config_file(tmp_path_factory)
    path.write_bytes(blob)
    try:
        assert isinstance(load_config(path), TrainConfig)
    except VitlabError as e:
        assert str(path) in str(e) or "valid keys" in str(e) or "must be" in str(e)


def test_a_config_path_that_is_no_file_is_a_vitlab_error(tmp_path):
    with pytest.raises(VitlabError, match="cannot be read"):
        load_config(tmp_path)  # a directory
    with pytest.raises(VitlabError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
