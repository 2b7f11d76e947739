from __future__ import annotations

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
    if overrides:
        data = _merge(data, overrides)
    return validate(model, data, str(path))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
