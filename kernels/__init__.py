"""Hot-path kernels. Each folder: `reference.py` (plain torch, the oracle) and `triton.py` (the fast path).

Imports nothing of the project's.
"""
