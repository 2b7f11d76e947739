"""State codec: exact round trips, version/format/kind checks, truncation, split/stack."""

from __future__ import annotations

import pytest
import torch

from recsys.modules.aaren import Aaren
from recsys.modules.state_codec import StateCodecError, decode, encode, split, stack, to_tensors
from recsys.modules.titans import NeuralMemory


def states():
    torch.manual_seed(0)
    x = torch.randn(3, 9, 8)
    lengths = torch.tensor([9, 0, 5])
    with torch.no_grad():
        aaren = Aaren(8, d_model=8, n_heads=2, n_layers=2).forward_state(x, lengths)
        titans = NeuralMemory(8, d_key=4, d_hidden=6, chunk_size=4).forward_state(x, lengths)
    return aaren, titans


def assert_same(a, b):
    ta, tb = to_tensors(a), to_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k   # bitwise, -inf included


@pytest.mark.parametrize("which", [0, 1])
def test_round_trip_is_exact_for_batches_and_single_users(which):
    state = states()[which]
    assert_same(decode(encode(state, "v1"), "v1"), state)
    users = split(state)
    assert len(users) == 3 and users[0].batch_size == 1
    back = [decode(encode(u, "v1"), "v1") for u in users]
    assert_same(stack(back), state)


def test_mismatches_and_bad_bytes_are_clear_errors():
    aaren, titans = states()
    data = encode(split(titans)[0], "model-abc")
    with pytest.raises(StateCodecError, match="model_version 'model-abc', expected 'model-xyz'"):
        decode(data, "model-xyz")
    with pytest.raises(StateCodecError, match="kind 'titans'"):
        decode(data, "model-abc", kind="aaren")
    for cut in (0, 5, 40, len(data) - 1):
        with pytest.raises(StateCodecError, match="truncated"):
            decode(data[:cut], "model-abc")
    with pytest.raises(StateCodecError, match="format"):
        decode(data.replace(b"recsys-state/1", b"recsys-state/9"), "model-abc")
    with pytest.raises(StateCodecError, match="expected bytes"):
        decode("text", "model-abc")
    with pytest.raises(ValueError, match="different kind"):
        stack([split(aaren)[0], split(titans)[0]])
