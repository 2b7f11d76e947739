"""A model's weights and buffers as plain named tensors, and back: what bundles (safetensors) and training
checkpoints store. Embedding tables are written as `<set>.<table>` through their TableSet, so the same
names come out whether the tables are plain or sharded."""

from __future__ import annotations

import torch
from torch import nn

from recsys.embeddings import table_sets


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """All weights and buffers as plain named tensors (tables as `<set>.<table>`; works when sharded)."""
    sets = table_sets(model)
    out = {f"{s}.{n}": w.contiguous() for s, t in sets.items() for n, w in t.weights().items()}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not any(name.startswith(s + ".") for s in sets):
            out[name] = t.detach().contiguous()
    return out


def load_state_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    sets = table_sets(model)
    expected = {n for n, _ in list(model.named_parameters()) + list(model.named_buffers()) if not any(n.startswith(s + ".") for s in sets)}
    expected |= {f"{s}.{n}" for s, t in sets.items() for n in t.specs}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise KeyError(f"model weights: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    for s, t in sets.items():
        t.load_weights({n: state[f"{s}.{n}"] for n in t.specs})
    own = dict(list(model.named_parameters()) + list(model.named_buffers()))
    with torch.no_grad():
        for name in expected:
            if name in own:
                if own[name].shape != state[name].shape:
                    raise ValueError(f"model weight {name!r}: shape {tuple(state[name].shape)}, expected {tuple(own[name].shape)}")
                own[name].copy_(state[name])
