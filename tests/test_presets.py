"""The YAML presets ship inside the package and are found by name, from any working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.config import ConfigError, presets
from recsys.config.base import load_yaml
from recsys.config.experiment import ExperimentConfig, load_experiment
from recsys.config.http import ServiceConfig


def test_presets_live_in_the_package():
    assert {"dare", "twin", "din", "tiny", "serve"} <= set(presets.names())
    for name in presets.names():
        path = presets.preset_path(name)
        assert path.is_file() and path.parent == Path(presets.__file__).parent
    assert presets.preset_path("dare.yaml") == presets.preset_path("dare")


def test_names_load_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_experiment("tiny") == load_experiment(presets.preset_path("tiny"))
    assert load_experiment("tiny", {"model": {"name": "din"}}).model.name == "din"
    assert isinstance(load_yaml("serve", ServiceConfig), ServiceConfig)


def test_an_existing_file_wins_over_a_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("data: mine\n")
    assert load_experiment("tiny").data == "mine"


def test_unknown_names_and_missing_files_list_the_presets(tmp_path):
    with pytest.raises(KeyError, match="presets: .*dare"):
        presets.preset_path("nope")
    for missing in ("nope", tmp_path / "tiny.yaml"):  # a path with a folder part is never a preset
        with pytest.raises(ConfigError, match="config file not found .*name a preset: .*tiny"):
            load_yaml(missing, ExperimentConfig)
