"""Row-sparse Adam for embedding tables with row gradients: torch.optim.SparseAdam's update with the
weight and both moments of each touched row read and written once (`cpu.c`), `reference.py` its torch form.
"""
