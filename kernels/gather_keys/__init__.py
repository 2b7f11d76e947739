"""The serving search's keys gathered straight from the attention tables (`recsys.models.attention.
stage1_from_tables`): each event's row of every field, and its folded position number, written once
(`cpu.c`); `reference.py` the torch form.
"""
