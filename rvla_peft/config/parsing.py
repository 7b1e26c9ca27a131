"""Recipes as typed dataclasses: YAML values coerced to the annotated types, unknown keys refused with the nearest
valid one, dotted ``key=value`` overrides, and help text, for any dataclass tree (no knowledge of the schema)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or an override that cannot be used; the message names the key and the fix."""


def check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class Variants:
    """A section whose dataclass is chosen by one of its own keys (the ``policy`` section by ``policy.family``).

    Put it in the section field's metadata (``metadata={"variants": Variants(...)}``). Each class subclasses the
    field's type; the section stays flat in YAML. A key that only other variants have is an error naming them,
    unless its value is that key's default there (older dumps that listed every variant's keys still load)."""

    key: str  # the discriminating key, e.g. "family"
    classes: Mapping[str, type]  # its value -> the section's dataclass
    default: str  # the value when the section does not set the key

    def owners(self, name: str) -> dict[str, dataclasses.Field]:
        """The variants that have field ``name``, with that field."""
        found = {value: {f.name: f for f in dataclasses.fields(cls)}.get(name) for value, cls in self.classes.items()}
        return {value: f for value, f in found.items() if f is not None}


def _type_name(tp: Any) -> str:
    """How an annotation reads in an error: ``str | None``, ``'episode' or 'step'``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(c) for c in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arg in arms:
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                if len(arms) == 1:  # X | None: X's own message (with its "did you mean"), plus null
                    raise ConfigError(f"{e} (or null)") from None
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            raise ConfigError(
                f"{key}: {value!r} is not one of {list(choices)}" + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            suggestion = f"; did you mean '{prefix}{hint[0]}'?" if hint else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{suggestion}")
        variants = fields[key].metadata.get("variants")
        if variants is not None and isinstance(value, dict):
            kwargs[key] = from_variant_dict(variants, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)


def from_variant_dict(variants: Variants, data: dict, prefix: str = "") -> Any:
    """The variant of a section that ``data[variants.key]`` names, built from ``data`` (see :class:`Variants`)."""
    choice = data.get(variants.key, variants.default)
    if not isinstance(choice, str) or choice not in variants.classes:
        hint = difflib.get_close_matches(str(choice), list(variants.classes), n=1)
        raise ConfigError(
            f"{prefix}{variants.key}: unknown {variants.key} {choice!r}; choose one of {sorted(variants.classes)}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
        )
    cls = variants.classes[choice]
    own = {f.name for f in dataclasses.fields(cls)}
    kept = {}
    for key, value in data.items():
        owners = variants.owners(key) if key not in own else {}
        if not owners:  # its own key, or a key of no variant (from_dict names the nearest valid one)
            kept[key] = value
            continue
        if any(_equals_default(value, cls_field, variants.classes[v], key) for v, cls_field in owners.items()):
            continue  # another variant's key at its default: what older dumps of every variant's keys hold
        raise ConfigError(
            f"{prefix}{key} applies to {prefix}{variants.key}={' or '.join(owners)} only; this section has "
            f"{prefix}{variants.key}={choice}"
        )
    return from_dict(cls, kept, prefix)


def _equals_default(value: Any, f: dataclasses.Field, cls: type, key: str) -> bool:
    try:
        return _coerce(value, typing.get_type_hints(cls)[f.name], key) == _default(f)
    except ConfigError:
        return False


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def read_yaml(path: Path) -> Any:
    """A recipe file parsed as YAML; a syntax error becomes one ConfigError line with the file, line and column."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_message(f"recipe {path}", e)) from None


def yaml_error_message(where: str, error: yaml.YAMLError) -> str:
    """``WHERE line L column C: PROBLEM`` (1-based, as editors count) from PyYAML's marks."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    text = f"{problem} ({context})" if context else problem
    if mark is None:
        return f"{where}: {text}"
    return f"{where} line {mark.line + 1} column {mark.column + 1}: {text}"


def apply_override(data: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value, e.g. ppo.learning_rate=3e-5")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{k}' is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_message(f"override {override!r}: value", e)) from None


def help_text(cls: type, prefix: str = "") -> str:
    """Every key with its default and help, for ``--help-config``; a variant's own keys name their variants."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(help_text(hints[f.name], f"{prefix}{f.name}."))
            if "variants" in f.metadata:
                lines.append(_variants_help(hints[f.name], f.metadata["variants"], f"{prefix}{f.name}."))
            continue
        lines.append(f"  {prefix}{f.name} = {_default(f)!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _variants_help(base: type, variants: Variants, prefix: str) -> str:
    shared = {f.name for f in dataclasses.fields(base)}
    names = dict.fromkeys(
        f.name for cls in variants.classes.values() for f in dataclasses.fields(cls) if f.name not in shared
    )
    lines = []
    for name in names:
        owners = variants.owners(name)
        f = next(iter(owners.values()))
        where = f"[{prefix}{variants.key}={' or '.join(owners)} only]"
        lines.append(f"  {prefix}{name} = {_default(f)!r}  {where}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
