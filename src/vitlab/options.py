"""Options declared once: a dataclass field says its name, type, default, help, choices and check,
and the config's YAML keys, the command-line flags and the validation all follow from it.

A *section* is a dataclass whose fields are options (:func:`option`) or other sections
(:func:`section`, nested in YAML under the field's name). Every option has one *key*, unique in
its config: the section's prefix plus the field name (``mae.mask_ratio`` is ``mae_mask_ratio``),
or the key the option names itself. The key is the command-line flag (``--mae-mask-ratio``) and
is also accepted in YAML in place of the nested path, which keeps configs written before the
sections existed loadable.

    @dataclass
    class Optim:
        lr: float = option(1e-3, help="peak learning rate", check=lambda v: v > 0, must="be positive")

:func:`from_dict` builds a section from YAML-like values (nested or flat keys), refusing unknown
keys with the valid ones, values of the wrong type and values an option's check refuses, each in
one line; :func:`add_arguments` and :func:`given` turn the same declarations into argparse flags
and back into overrides for :func:`merged`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Iterable, Mapping

from .errors import VitlabError, closest_names

__all__ = ["Leaf", "Spec", "add_arguments", "check_values", "from_dict", "given", "leaves", "merged", "option",
           "section", "to_dict", "valid_keys"]


@dataclass(frozen=True)
class Spec:
    """What an option says about itself besides its name, type and default."""

    help: str
    choices: tuple[Any, ...] | None = None
    #: ``check(value)`` is true for acceptable values; ``must`` completes "KEY must ...".
    check: Callable[[Any], bool] | None = None
    must: str = ""
    metavar: str | None = None
    #: The key when it is not the section's prefix plus the field name.
    key: str | None = None


@dataclass(frozen=True)
class SectionSpec:
    """How a nested section is attached: the prefix of its options' keys and its help title."""

    prefix: str = ""
    title: str = ""


def option(default: Any = MISSING, *, help: str, choices: Iterable[Any] | None = None,
           check: Callable[[Any], bool] | None = None, must: str = "", metavar: str | None = None,
           key: str | None = None, default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A dataclass field that is an option (see the module docstring)."""
    spec = Spec(help, tuple(choices) if choices is not None else None, check, must, metavar, key)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": spec})


def section(cls: type, *, prefix: str = "", title: str = "") -> Any:
    """A dataclass field holding the nested section ``cls``; its options' keys start with ``prefix``."""
    return dataclasses.field(default_factory=cls, metadata={"section": SectionSpec(prefix, title)})


@dataclass(frozen=True)
class Leaf:
    """One option of a config, wherever it is nested."""

    #: Field names from the config down to the option, e.g. ``("optim", "lr")``.
    path: tuple[str, ...]
    key: str
    spec: Spec
    hint: Any
    default: Any
    #: Title of the section it belongs to (``""`` at the top).
    group: str

    @property
    def dotted(self) -> str:
        """The field path joined with dots, e.g. ``"optim.lr"``."""
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        """The command-line flag of the option: ``--`` and its key with dashes, e.g. ``--label-smoothing``."""
        return "--" + self.key.replace("_", "-")


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def leaves(cls: type, prefix: str = "", path: tuple[str, ...] = (), group: str = "") -> list[Leaf]:
    """Every option of the section ``cls`` and of the sections nested in it, in declaration order."""
    out = []
    for f, hint in _fields(cls):
        if "section" in f.metadata:
            sub: SectionSpec = f.metadata["section"]
            out += leaves(hint, prefix + sub.prefix, path + (f.name,), sub.title or f.name)
        elif "option" in f.metadata:
            spec: Spec = f.metadata["option"]
            out.append(Leaf(path + (f.name,), spec.key or prefix + f.name, spec, hint, _default(f), group))
    return out


def valid_keys(cls: type) -> list[str]:
    """Every key a config of ``cls`` accepts at its top: field names, then the keys of nested options."""
    names = [f.name for f in dataclasses.fields(cls)]
    return names + [leaf.key for leaf in leaves(cls) if leaf.key not in names]


# --- values from YAML or code -----------------------------------------------------------------------


def from_dict(cls: type, values: Any, source: str = "config") -> Any:
    """Build the section ``cls`` from nested or flat keys, checking every value; one line per problem.

    A nested section's value may be a mapping or an instance of its class. Keys absent keep their
    defaults. Raises :class:`VitlabError` for anything else than a valid config.
    """
    tree: dict[str, Any] = {}
    _place(cls, values, tree, (), source, {leaf.key: leaf.path for leaf in leaves(cls)})
    obj = _build(cls, tree, source)
    check_values(obj)
    return obj


def _place(cls: type, values: Any, tree: dict[str, Any], path: tuple[str, ...], source: str,
           flat: dict[str, tuple[str, ...]]) -> None:
    """Sort ``values`` (given at ``path``) into ``tree`` by field path; flat keys only at the top."""
    where = source if not path else f"{source} ({'.'.join(path)} section)"
    if values is not None and not isinstance(values, Mapping):
        what = f"'{path[-1]}' in {source}" if path else source
        raise VitlabError(f"{what} must be a mapping of keys to values, not {values!r}")
    fields = {f.name: (f, hint) for f, hint in _fields(cls)}
    for key, value in (values or {}).items():
        if isinstance(key, str) and key in fields and "section" in fields[key][0].metadata:
            if value is None:
                continue
            sub_cls = fields[key][1]
            if isinstance(value, sub_cls):
                value = to_dict(value)
            _place(sub_cls, value, tree.setdefault(key, {}), path + (key,), source, flat)
        elif isinstance(key, str) and key in fields:
            tree[key] = value
        elif not path and isinstance(key, str) and key in flat:
            node = tree
            for name in flat[key][:-1]:
                node = node.setdefault(name, {})
            node[flat[key][-1]] = value
        else:
            valid = valid_keys(cls) if not path else list(fields)
            close = closest_names(key, valid) if isinstance(key, str) else []
            hint = f"did you mean {', '.join(close)}? " if close else ""
            shown = f"'{key}'" if isinstance(key, str) else repr(key)
            raise VitlabError(f"unknown key {shown} in {where}; {hint}valid keys: {', '.join(valid)}")


def _build(cls: type, tree: dict[str, Any], source: str, path: tuple[str, ...] = ()) -> Any:
    where = source if not path else f"{source} ({'.'.join(path)} section)"
    kwargs = {}
    for f, hint in _fields(cls):
        if "section" in f.metadata:
            kwargs[f.name] = _build(hint, tree.get(f.name, {}), source, path + (f.name,))
        elif f.name in tree:
            kwargs[f.name] = _typed(f.name, hint, tree[f.name], where)
    return cls(**kwargs)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
               tuple: "a list"}


def check_values(obj: Any) -> None:
    """Refuse any option of ``obj`` (nested sections included) outside its choices or failing its check."""
    for leaf in leaves(type(obj)):
        value = _value_at(obj, leaf.path)
        if value is None:
            continue
        if leaf.spec.choices is not None and value not in leaf.spec.choices:
            raise VitlabError(f"{leaf.key} must be {_either(leaf.spec.choices)}, not {value!r}")
        if leaf.spec.check is not None and not leaf.spec.check(value):
            raise VitlabError(f"{leaf.key} must {leaf.spec.must}, not {value!r}")


def _either(choices: tuple[Any, ...]) -> str:
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _typed(key: str, hint: Any, value: Any, source: str) -> Any:
    """Refuse values of the wrong type (``epochs: ten``); integers pass as floats, lists as tuples."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in members:
        return None  # an optional option left unset
    allowed = [typing.get_origin(t) or t for t in members if t is not type(None)]  # dict[str, Any] -> dict
    if any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in allowed):
        return _typed_items(key, hint, value, source) if isinstance(value, tuple) else value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and str not in allowed and isinstance(value, str) and _is_number(value):
        return float(value)  # YAML 1.1 reads `lr: 1e-3` (no dot) as a string
    if tuple in allowed and isinstance(value, list):
        return _typed_items(key, hint, tuple(value), source)
    expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in allowed)
    raise VitlabError(f"'{key}' in {source} must be {expected}, not {value!r}")


def _typed_items(key: str, hint: Any, value: tuple, source: str) -> tuple:
    """The items of a ``tuple[T, ...]`` option, each checked as a ``T``."""
    item = _tuple_item(hint)
    return value if item is Any else tuple(_typed(key, item, v, source) for v in value)


def _tuple_item(hint: Any) -> Any:
    """``T`` of a ``tuple[T, ...]`` hint (or of ``tuple[T, ...] | None``); ``Any`` when unsaid."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((typing.get_args(t)[0] for t in members if typing.get_origin(t) is tuple and typing.get_args(t)), Any)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def to_dict(obj: Any) -> dict[str, Any]:
    """The section as nested plain values (what YAML holds); tuples become lists."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "section" in f.metadata:
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        out[f.name] = value
    return out


def merged(obj: Any, overrides: Mapping[str, Any], source: str = "options") -> Any:
    """A copy of the section ``obj`` with ``overrides`` (keys, dotted paths or field names) applied.

    ``None`` values are skipped (an option not given); a mapping option (``model_args``) gains the
    given entries instead of being replaced.
    """
    cls = type(obj)
    values = to_dict(obj)
    by_key = {leaf.key: leaf for leaf in leaves(cls)}
    by_path = {leaf.dotted: leaf for leaf in leaves(cls)}
    for key, value in overrides.items():
        if value is None:
            continue
        leaf = by_key.get(key) or by_path.get(key)
        if leaf is None:
            raise VitlabError(f"unknown option '{key}'; valid ones: {', '.join(by_key)}")
        node = values
        for name in leaf.path[:-1]:
            node = node[name]
        current = node[leaf.path[-1]]
        node[leaf.path[-1]] = {**current, **value} if isinstance(current, dict) and isinstance(value, Mapping) \
            else value
    return from_dict(cls, values, source)


# --- the command line -------------------------------------------------------------------------------


def _base_type(hint: Any) -> Any:
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    members = [t for t in members if t is not type(None)]
    return typing.get_origin(members[0]) or members[0]


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of a mapping option, the value read as YAML (``0`` a number, ``true`` a bool)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE; e.g. attn_drop_rate=0")
    return key.strip(), yaml.safe_load(value)


def _comma_list(item_type: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(item_type(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list") from None
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type, defaults: Any = None,
                  only: Callable[[Leaf], bool] | None = None) -> list[Leaf]:
    """Add a flag for every option of ``cls`` (that ``only`` accepts), grouped by section.

    Every flag defaults to ``None`` ("not given"), so :func:`given` returns only what the user
    typed; the help shows the default of ``defaults`` (an instance of ``cls``) or of the
    declaration. Booleans get ``--x/--no-x``, lists take ``A,B,C``, a mapping ``KEY=VALUE``
    (repeatable). Returns the leaves that got a flag.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    added = []
    for leaf in leaves(cls):
        if only is not None and not only(leaf):
            continue
        target = parser if not leaf.group else groups.setdefault(leaf.group, parser.add_argument_group(leaf.group))
        default = _value_at(defaults, leaf.path) if defaults is not None else leaf.default
        base = _base_type(leaf.hint)
        shown = f" (default {_show(default)})" if base is not dict and default is not None else ""
        kwargs: dict[str, Any] = dict(dest=leaf.key, default=None, help=(leaf.spec.help + shown).replace("%", "%%"))
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is dict:
            kwargs.update(action="append", type=_key_value, metavar=leaf.spec.metavar or "KEY=VALUE")
        elif base is tuple:
            kwargs.update(type=_comma_list(_tuple_item(leaf.hint)), metavar=leaf.spec.metavar or "A,B,...")
        else:
            kwargs.update(type=base, metavar=leaf.spec.metavar or leaf.key.split("_")[-1].upper())
            if leaf.spec.choices is not None:
                kwargs.update(choices=leaf.spec.choices, metavar=None)
        target.add_argument(leaf.flag, **kwargs)
        added.append(leaf)
    return added


def _value_at(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def given(args: argparse.Namespace, added: Iterable[Leaf]) -> dict[str, Any]:
    """The options the user gave on the command line (by key), for :func:`merged`."""
    out = {}
    for leaf in added:
        value = getattr(args, leaf.key, None)
        if value is None:
            continue
        out[leaf.key] = dict(value) if _base_type(leaf.hint) is dict else value
    return out
