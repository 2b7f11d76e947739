"""Top-k attention search over long histories (the general search unit).

`topk(query, keys, lengths, k, segments)` is the one entry point; the backend is chosen at run time.
"""

from kernels.topk_attention.reference import scaled_scores, segment_scale
from retrieval.dispatch import topk

__all__ = ["topk", "scaled_scores", "segment_scale"]
