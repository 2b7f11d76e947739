"""The reference against a per-row Python ranking, written from the spec (segment scales, mask, ties)."""

import math

import torch

from kernels.topk_attention.reference import topk_reference


def _brute(q, keys, n, k, segments):
    scale = [1 / math.sqrt(s) for s in segments for _ in range(s)]
    scored = [(sum(a * b * c for a, b, c in zip(q.tolist(), x.tolist(), scale)), j) for j, x in enumerate(keys[:n])]
    ranked = sorted(scored, key=lambda t: (-t[0], t[1]))[:k]
    ranked += [(float("-inf"), -1)] * (k - len(ranked))
    return [s for s, _ in ranked], [j for _, j in ranked]


def test_reference_matches_brute_force_training_layout():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-2, 3, (4, 5), generator=gen).float()
    keys = torch.randint(-2, 3, (4, 12, 5), generator=gen).float()
    lengths = torch.tensor([12, 0, 3, 7])
    scores, idx = topk_reference(q, keys, lengths, 6, [4, 1])
    for b in range(4):
        want_s, want_i = _brute(q[b], keys[b], int(lengths[b]), 6, [4, 1])
        assert idx[b].tolist() == want_i
        torch.testing.assert_close(scores[b], torch.tensor(want_s))


def test_reference_matches_brute_force_serving_layout():
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-1, 2, (3, 4), generator=gen).float()
    keys = torch.randint(-1, 2, (9, 4), generator=gen).float()
    scores, idx = topk_reference(q, keys, 8, 10)
    for c in range(3):
        want_s, want_i = _brute(q[c], keys, 8, 10, [4])
        assert idx[c].tolist() == want_i
        torch.testing.assert_close(scores[c], torch.tensor(want_s))
