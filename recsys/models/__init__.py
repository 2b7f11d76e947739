"""CTR models: DARE (main), TWIN and DIN (baselines). `build_model(config, n_items, n_cates)`."""

from __future__ import annotations

from torch import nn

from recsys.config.model import ModelConfig
from recsys.models.output import ModelOutput
from recsys.models.dare import DARE
from recsys.models.din import DIN
from recsys.models.twin import TWIN

MODELS: dict[str, type[nn.Module]] = {"dare": DARE, "twin": TWIN, "din": DIN}


def build_model(config: ModelConfig, n_items: int, n_cates: int) -> nn.Module:
    """A freshly initialised model (seed torch first for reproducible weights)."""
    if n_items < 2 or n_cates < 2:
        raise ValueError(f"id spaces need padding 0 plus at least one id: n_items={n_items}, n_cates={n_cates}")
    return MODELS[config.name](config, n_items, n_cates)


__all__ = ["DARE", "DIN", "MODELS", "TWIN", "ModelOutput", "build_model"]
