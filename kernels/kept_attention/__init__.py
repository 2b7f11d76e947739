"""Stage 2's attention over the events the search kept, for one served history (`recsys.models.dare.
served_stage2`): each kept event's folded attention key scored against its target, a softmax over the k kept,
and the representation rows summed with those weights, in one pass over the kept rows (`cpu.c`);
`reference.py` the torch form.
"""
