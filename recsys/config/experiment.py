"""A training run's whole config: where the data is, which model, how to train. Presets: recsys/config/presets/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from recsys.config.base import StrictModel, load_yaml
from recsys.config.model import ModelConfig
from recsys.config.train import TrainConfig


class ExperimentConfig(StrictModel):
    """A training run (`recsys train --config`, a preset such as `dare` or a YAML file); a bundle's config.yaml is one too."""

    data: str = Field(description="dataset folder (benchmark format); a relative path is looked up in the data "
                      "roots: RECSYS_SHARED, ../shared, then the download cache (RECSYS_DATA or ~/.cache/recsys)")
    model: ModelConfig = Field(ModelConfig(), description="which model, its dimensions and switches")
    train: TrainConfig = Field(TrainConfig(), description="optimisation, validation cadence, model selection")

    def data_path(self) -> Path:
        from recsys.paths import find_data

        p = Path(self.data)
        return p if p.is_absolute() else find_data(p)


def load_experiment(config: "ExperimentConfig | str | Path", overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """A config object passes through (with overrides applied); a path is loaded and validated."""
    if isinstance(config, ExperimentConfig):
        if not overrides:
            return config
        from recsys.config.base import _merge, validate

        return validate(ExperimentConfig, _merge(config.model_dump(), overrides), "<overrides>")
    return load_yaml(config, ExperimentConfig, overrides)
