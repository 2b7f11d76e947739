"""Row kernels of the `sparse` embedding table backend: the lookup's gradient summed into its rows, and
SparseAdam's row update with each row's weight and moments read and written once (`cpu.c`); `reference.py`
their torch forms.
"""
