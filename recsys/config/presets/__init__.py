"""The YAML presets shipped inside the package (this folder), found with importlib.resources.

`recsys train --config dare` (a preset name) and `--config path/to/my.yaml` (a file) both work; so do
`load_experiment("tiny")` and `load_yaml("serve", ServiceConfig)`. A file that exists wins over a preset of
the same name. Nothing here depends on where the package is installed or on a repository checkout.
"""

from __future__ import annotations

import atexit
import contextlib
from importlib import resources
from pathlib import Path

_SUFFIX = ".yaml"
_extracted = contextlib.ExitStack()  # only used when the package is not on a file system (e.g. a zip)
atexit.register(_extracted.close)


def names() -> list[str]:
    """The preset names, e.g. ['dare', 'dare-full', ..., 'serve', 'tiny', ...]."""
    return sorted(p.name[: -len(_SUFFIX)] for p in resources.files(__name__).iterdir() if p.name.endswith(_SUFFIX))


def preset_path(name: str) -> Path:
    """The file of preset `name` ('dare' or 'dare.yaml'); KeyError naming the presets when there is none."""
    stem = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name
    if stem not in names():
        raise KeyError(f"no preset {name!r}; presets: {', '.join(names())}")
    res = resources.files(__name__) / (stem + _SUFFIX)
    if isinstance(res, Path):
        return res
    return _extracted.enter_context(resources.as_file(res))


def resolve(config: str | Path) -> Path:
    """An existing file as given; else a bare preset name (no folder part) as its packaged file; else the path
    unchanged, so that the caller reports it as not found."""
    path = Path(config)
    if path.is_file() or path.parent != Path("."):
        return path
    try:
        return preset_path(path.name)
    except KeyError:
        return path


__all__ = ["names", "preset_path", "resolve"]
