"""Training: the one step (step.py) and the single-process trainer (trainer.py)."""

from recsys.train.trainer import RunResult, evaluate, predict, score, train

__all__ = ["RunResult", "evaluate", "predict", "score", "train"]
