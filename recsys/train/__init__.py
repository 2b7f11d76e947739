"""Training: the one step (step.py), the one loop (loop.py, also run by every Ray Train worker), the
single-process trainer (trainer.py) and split metrics, whole or merged from shards (evaluation.py)."""

from recsys.train.trainer import RunResult, evaluate, predict, score, train

__all__ = ["RunResult", "evaluate", "predict", "score", "train"]
