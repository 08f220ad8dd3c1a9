"""Every option is declared once: each can be set from the command line and from YAML, and every
flag of a command that writes a run, or analyses, is an option (or says what to do with the run)."""

import dataclasses

import pytest
import yaml

from vitlab.analysis.catalog import AnalysisOptions
from vitlab.analysis.registry import RunOptions
from vitlab.cli import RUN_COMMANDS, build_parser, run_config
from vitlab.config import TrainConfig, dump_config, load_config
from vitlab.options import Leaf, leaves, merged

#: Flags that say what to do with a run rather than how to train it.
COMMAND_FLAGS = {"help", "config", "out", "resume", "overwrite", "trust_pickle"}

#: Valid values where "the default, changed a little" would break a rule across options.
SPECIAL = {"model": "resnet20_cifar", "data": "cifar10", "randaugment": "rand-m9-mstd0.5",
           "progressive_resize": "16:1", "init_weights": "weights.safetensors", "recipe": "vit",
           "mae_decoder_dim": 64, "mae_decoder_heads": 8, "objective": "mae", "model_args": {"depth": 2}}


def other_value(leaf: Leaf):
    """A valid value of ``leaf`` other than its default."""
    if leaf.key in SPECIAL:
        return SPECIAL[leaf.key]
    if leaf.spec.choices is not None:
        return next(c for c in leaf.spec.choices if c != leaf.default)
    default = leaf.default
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if default else 0.5
    hint = str(leaf.hint)
    return 16 if "int" in hint else 0.5 if "float" in hint else "somewhere"


def as_argument(leaf: Leaf, value) -> list[str]:
    if isinstance(value, bool):
        return [leaf.flag if value else leaf.flag.replace("--", "--no-", 1)]
    if isinstance(value, dict):
        return [leaf.flag, *(f"{k}={v}" for k, v in value.items())]
    return [leaf.flag, str(value)]


def command_for(leaf: Leaf) -> str:
    return next(command for command, scope in RUN_COMMANDS.items() if scope(leaf))


def value_at(obj, path):
    for name in path:
        obj = getattr(obj, name)
    return obj


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A run directory's config, enough for `vitlab finetune RUN` to start from."""
    run = tmp_path_factory.mktemp("source")
    (run / "config.yaml").write_text(dump_config(TrainConfig(model="vit_nano_patch4_32")))
    return run


TRAIN_LEAVES = [leaf for leaf in leaves(TrainConfig) if leaf.key != "finetune_from"]


@pytest.mark.parametrize("leaf", TRAIN_LEAVES, ids=lambda leaf: leaf.key)
def test_every_option_can_be_set_from_the_command_line(leaf, source_run):
    value = other_value(leaf)
    command = command_for(leaf)
    argv = [command, *(["--objective", leaf.path[0]] if command == "pretrain" and leaf.key != "objective" else []),
            *([str(source_run)] if command == "finetune" else []), *as_argument(leaf, value)]
    cfg = run_config(build_parser().parse_args(argv))
    assert value_at(cfg, leaf.path) == (value if leaf.key != "recipe" else "vit")


def test_the_source_of_a_fine_tuning_run_is_its_positional_argument(source_run):
    cfg = run_config(build_parser().parse_args(["finetune", str(source_run), "--finetune-mode", "linear"]))
    assert cfg.finetune.source == str(source_run) and cfg.model == "vit_nano_patch4_32"


SECTIONS = {f.name for f in dataclasses.fields(TrainConfig)}
#: Each option nested in its section, and by its flat key, except where the key names a section
#: (``data`` is the data section in YAML; the flag ``--data`` sets ``data.name``).
YAML_CASES = [(leaf, flat) for leaf in leaves(TrainConfig) for flat in (False, True)
              if not (flat and len(leaf.path) > 1 and leaf.key in SECTIONS)]


@pytest.mark.parametrize("leaf, flat", YAML_CASES, ids=lambda case: getattr(case, "key", None) or
                         ("flat" if case else "nested"))
def test_every_option_can_be_set_from_yaml(leaf, flat, tmp_path):
    value = other_value(leaf)
    values: dict = {leaf.key: value} if flat else {}
    if not flat:
        node = values
        for name in leaf.path[:-1]:
            node = node.setdefault(name, {})
        node[leaf.path[-1]] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    cfg = load_config(path)
    assert value_at(cfg, leaf.path) == value
    assert value_at(load_config_text(tmp_path, dump_config(cfg)), leaf.path) == value  # and it is written back


def load_config_text(tmp_path, text: str) -> TrainConfig:
    path = tmp_path / "again.yaml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize("command", [*RUN_COMMANDS, "compare", "analyze"])
def test_every_flag_is_an_option_or_a_command_flag(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    keys = {leaf.key for cls in (TrainConfig, AnalysisOptions, RunOptions) for leaf in leaves(cls)}
    compare_only = {"models", "runs", "epochs", "subjects", "pretrained"}
    for action in sub._actions:
        assert action.dest in keys | COMMAND_FLAGS | compare_only | {"finetune_from"}, (command, action.dest)
        if action.option_strings and action.dest in keys:
            assert action.option_strings[0] == "--" + action.dest.replace("_", "-")  # the flag is the key


@pytest.mark.parametrize("leaf", leaves(AnalysisOptions) + leaves(RunOptions), ids=lambda leaf: leaf.key)
def test_every_analysis_option_can_be_set_from_the_command_line(leaf):
    value = ("cka",) if leaf.key == "analyses" else (1, 2) if "tuple" in str(leaf.hint) else other_value(leaf)
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    args = build_parser().parse_args(["analyze", "vit_nano_patch4_32", leaf.flag, text])
    cls = RunOptions if leaf in leaves(RunOptions) else AnalysisOptions
    added = args.run_added if cls is RunOptions else args.analysis_added
    from vitlab.options import given

    assert value_at(merged(cls(), given(args, added)), leaf.path) == value


def test_a_config_written_before_the_sections_loads_unchanged(tmp_path):
    """A run directory's config.yaml from before the sections existed (one flat mapping) still loads."""
    from pathlib import Path

    cfg = load_config(Path(__file__).parent / "data" / "flat_config_0.1.yaml")
    assert (cfg.model, cfg.epochs, cfg.objective) == ("vit_nano_patch4_32", 3, "mae")
    assert (cfg.optim.lr, cfg.optim.warmup_lr, cfg.optim.momentum, cfg.optim.grad_clip) == (3e-4, 1e-5, 0.8, 1.0)
    assert (cfg.mix_prob, cfg.mae.mask_ratio, cfg.dino.prototypes, cfg.eval_batch_size) == (0.5, 0.6, 256, 64)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep, cfg.accel.precision) == (50, 2, "auto")
    assert (cfg.finetune.mode, cfg.finetune.reinit_blocks) == ("linear", 1)
    assert (cfg.data.num_train, cfg.data.root, cfg.data.augment) == (512, "/data/cifar", "none")
    assert load_config_text(tmp_path, dump_config(cfg)) == cfg  # and it is written back in sections
