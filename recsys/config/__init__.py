"""Typed configuration: YAML files (the shipped presets: recsys/config/presets/), validated by pydantic.

Each concern owns its section model (data.py, model.py, train.py, serve.py); `load_yaml` validates a
file against a model and turns any error into one message naming the file and the key.
"""

from recsys.config.base import ConfigError, StrictModel, load_yaml

__all__ = ["ConfigError", "StrictModel", "load_yaml"]
