from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the file and the key."""


class StrictModel(BaseModel):
    """Unknown keys are errors, types are not coerced from strings, instances are immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def validate(model: type[T], data: Any, source: str = "<config>") -> T:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def load_yaml(path: str | Path, model: type[T], overrides: dict[str, Any] | None = None) -> T:
    """Load `path` as `model`. `overrides` is a nested dict merged over the file's content.

    `path` is a YAML file or the name of a preset shipped in the package (`recsys.config.presets`, e.g. "dare").
    """
    data, source = _read_yaml(path)
    if overrides:
        data = _merge(data, overrides)
    return validate(model, data, source)


def _read_yaml(path: str | Path) -> tuple[dict, str]:
    """The mapping in a YAML file or preset, and the file's path (for messages)."""
    from recsys.config import presets

    path = presets.resolve(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (or name a preset: {', '.join(presets.names())})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        # One line: where and what (PyYAML's own message spans several lines with a caret drawing).
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: not valid YAML: {where}{getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: <root>: expected a mapping, got {type(data).__name__}")
    return data, str(path)


ENV_PREFIX = "RECSYS_"


def load_config(path: str | Path | None, model: type[T], environ: Mapping[str, str]) -> T:
    """`model` from the YAML file or preset `path` (None: the defaults), with every field the environment sets
    over it (`env_overrides`): file < environment; command-line flags go over the result."""
    env, names = env_overrides(model, environ)
    data, source = ({}, "<defaults>") if path is None else _read_yaml(path)
    if not env:
        return validate(model, data, source)
    try:
        return model.model_validate(_merge(data, env))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(str(p) for p in err["loc"])
            var = next((n for path, n in names.items() if loc[:len(path)] == path), None)
            key = ".".join(loc) or "<root>"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{var} (environment): {key}: {msg}" if var else f"{source}: {key}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def env_overrides(model: type[BaseModel], environ: Mapping[str, str]) -> tuple[dict, dict[tuple[str, ...], str]]:
    """The fields of `model` set in the environment: `RECSYS_<FIELD>` for a top-level field,
    `RECSYS_<SECTION>__<FIELD>` (and deeper, `__` between levels) for nested ones, any case, e.g.
    `RECSYS_HTTP__PORT=8001`, `RECSYS_SERVE__STATE__SEQ_CAP=500`. A value is YAML (`8001`, `true`, `null`,
    `[16, 8]`), except for a text field, which takes it as it is. Variables whose first part names no field
    of `model` are left alone (they may be meant for another program, e.g. RECSYS_API_KEY); below that, a
    name that is no field is an error naming the variable. -> (nested dict, {field path: variable name})."""
    out: dict = {}
    names: dict[tuple[str, ...], str] = {}
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if parts[0] not in model.model_fields:
            continue
        cls: Any = model
        for i, part in enumerate(parts):
            sub = _submodel(cls)
            if sub is None or part not in sub.model_fields:
                where = ".".join(parts[:i]) or "<root>"
                raise ConfigError(f"{name} (environment): {'.'.join(parts)}: unknown key (no field {part!r} in {where})")
            cls = sub.model_fields[part].annotation
        raw = environ[name]
        if _wants_text(cls):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as e:
                raise ConfigError(f"{name} (environment): not a YAML value: {getattr(e, 'problem', None) or e}") from None
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name} (environment): {'.'.join(parts)}: its section is also set, as a non-mapping")
        node[parts[-1]] = value
        names[tuple(parts)] = name
    return out, names


def _options(annotation: Any) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    for a in _options(annotation):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _wants_text(annotation: Any) -> bool:
    for a in _options(annotation):
        if a is str or (isinstance(a, type) and issubclass(a, enum.Enum) and issubclass(a, str)):
            return True
        if typing.get_origin(a) is typing.Literal and all(isinstance(x, str) for x in typing.get_args(a)):
            return True
    return False


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
