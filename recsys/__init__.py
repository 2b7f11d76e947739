"""CTR models for lifelong user behaviour sequences.

`import recsys` stays light: submodules import torch, pyarrow, ray... only when used.
"""

__version__ = "0.1.0"
