"""The score request's all-int fast path (`schemas._ScoreRequest`) decides exactly as the full schema: the same
accepted values (ids as int) and, for everything it does not accept, the full schema's errors."""

import numpy as np
from pydantic import TypeAdapter, ValidationError

from service.schemas import MAX_ID, request_models

ODD = [0, 1, 7, MAX_ID, MAX_ID + 1, -1, 5.0, 5.5, -0.0, float(MAX_ID + 1), True, False, "3", None, [1], 1e300]


def _outcome(model, body):
    try:
        r = model.model_validate(body)
    except ValidationError as e:
        return "error", e.errors(include_url=False)
    cands = [(c["item_id"], type(c["item_id"]), c.get("category_id"), type(c.get("category_id"))) for c in r.candidates]
    return "ok", (r.user_id, type(r.user_id), r.explain, cands)


def _bodies(rng: np.random.Generator, n: int):
    def value():
        return ODD[rng.integers(len(ODD))] if rng.random() < 0.3 else int(rng.integers(0, 1_000_000))

    for _ in range(n):
        cands = []
        for _ in range(int(rng.integers(0, 6))):
            c = {"item_id": value()}
            if rng.random() < 0.7:
                c["category_id"] = value()
            if rng.random() < 0.05:
                c["extra"] = 1
            if rng.random() < 0.05:
                del c["item_id"]
            cands.append(c)
        body = {"user_id": value(), "candidates": cands}
        if rng.random() < 0.3:
            body["explain"] = [True, False, 1, "yes"][int(rng.integers(4))]
        if rng.random() < 0.05:
            body["other"] = 2
        if rng.random() < 0.05:
            del body["user_id"]
        yield body


def test_fast_path_decides_as_the_full_schema():
    fast = request_models(max_candidates=4, max_events=4).score
    full = request_models(max_candidates=4, max_events=4).score
    full._all_ints = TypeAdapter(None)  # accepts no request: every body takes the full schema
    seen = set()
    for body in _bodies(np.random.default_rng(0), 3000):
        got, want = _outcome(fast, body), _outcome(full, body)
        assert got == want, body
        seen.add(got[0])
    assert seen == {"ok", "error"}


def test_plain_int_requests_take_the_fast_path_and_whole_floats_the_full_one():
    model = request_models(max_candidates=4, max_events=4).score
    body = {"user_id": 3, "candidates": [{"item_id": 1, "category_id": 2}, {"item_id": 9}]}
    assert model._all_ints.validate_python(body) == body
    r = model.model_validate(body)
    assert r.candidates == body["candidates"] and r.explain is False and r.user_id == 3
    whole = {"user_id": 3.0, "candidates": [{"item_id": 1.0}]}
    try:
        model._all_ints.validate_python(whole)
        raise AssertionError("the fast path took a float id")
    except ValidationError:
        pass
    r = model.model_validate(whole)
    assert (r.user_id, r.candidates) == (3, [{"item_id": 1}]) and type(r.user_id) is int
