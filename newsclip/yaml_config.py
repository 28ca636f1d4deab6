"""Typed configs from YAML: frozen dataclasses built key by key, with errors that name the bad key."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A job file or override that does not fit the schema; the message names the key."""


def check_value(key: str, tp: Any, value: Any) -> Any:
    """Convert/validate one value against its annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_value(key, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {check_value(f"{key} (a key)", key_type, k): check_value(f"{key}.{k}", value_type, v)
                for k, v in value.items()}
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(check_value(f"{key}[{i}]", typing.get_args(tp)[0], v) for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    if tp in (int, float) and value < 0:
        raise ConfigError(f"{key}: must not be negative, got {value!r}")
    return value


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from a raw mapping, each value checked against its annotation."""
    if raw is None:
        raw = {}
    where = prefix or "the job file"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        known = f"known keys{' of ' + prefix if prefix else ''}"
        raise ConfigError(f"{key}: unknown key; {known}: {', '.join(sorted(names))}")
    values = {f.name: check_value(f"{prefix}.{f.name}" if prefix else f.name, hints[f.name], raw[f.name])
              for f in dataclasses.fields(cls) if f.name in raw}  # in declaration order: eval before knn
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        # a section's own check says "key: why" (or "ClassName.key: why"); name the full dotted key
        message = str(e).removeprefix(f"{cls.__name__}.")
        raise ConfigError(f"{prefix}.{message}" if prefix else message) from e


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `--set a.b=value` to the raw mapping (value parsed as YAML: numbers, booleans, lists)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set input.articles=data/articles")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text else None


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, again: int):
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping, where PyYAML silently keeps the last one."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(key, seen[key] + 1, key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path | None, overrides: list[str] = (), what: str = "job file") -> dict:
    """A YAML mapping (safe_load, a key given twice refused; empty when `path` is None) with `key=value` overrides
    applied."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            inside = sorted(p.name for p in path.glob("*.y*ml"))[:5]
            raise ConfigError(f"{path}: is a folder; expected a {what} (a YAML file)"
                              + (f", e.g. one of {', '.join(inside)} in it" if inside else ""))
        try:
            raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: {what} not found") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the {what}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a {what}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except _DuplicateKey as e:
            raise ConfigError(f"{path}: line {e.again}: the key {e.key!r} is given twice (first on line {e.first}); "
                              "keep one") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def to_dict(cfg: Any) -> Any:
    """A plain, YAML-ready view of a config (tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg
