"""The demo's online half: the service on embedded Redis, held-out events streamed through /v1/events and the
in-process stream worker, live scores checked against the offline model, latency percentiles.

Held-out users: users of the test split, whose events up to their first test target are streamed in (the
service starts empty). Their first test rows are then scored live and offline (the bundle's model on the
same history): the two must agree. The service speaks catalogue ids: the dataset's dense ids are sent as
the raw ids they stand for (its vocabulary), as a client holding the original catalogue would.
"""

from __future__ import annotations

import json
import secrets
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from recsys.cli.progress import console, progress_bar


def _percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {f"p{q}": round(float(np.percentile(a, q)), 3) for q in (50, 90, 99)} | {"max": round(float(a.max()), 3)}


def _offline_scores(bundle: Path, dataset, rows: np.ndarray) -> np.ndarray:
    from recsys.bundle import load_bundle
    from recsys.data.sequences import assemble

    b = load_bundle(bundle)
    batch = assemble(dataset.store, dataset.splits["test"], rows, b.config.model.max_len)
    with torch.no_grad():
        return torch.sigmoid(b.model(batch).logit).numpy()


def _wait_applied(client, users: list[int], expected: dict[int, int], timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(users)
    with progress_bar("stream worker applying events") as update:
        total = sum(expected.values())
        while pending:
            for u in list(pending):
                r = client.get(f"/v1/users/{u}")
                r.raise_for_status()
                if r.json()["history_length"] >= expected[u]:
                    pending.discard(u)
            update(total - sum(expected[u] for u in pending), total)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"events of {len(pending)} users not applied within {timeout_s:.0f} s")
            time.sleep(0.05)


def service_stage(bundle: Path, folder: Path, out: Path, small: bool) -> dict:
    import httpx

    from recsys.config.http import HttpConfig, ServiceConfig
    from recsys.config.serve import ServeConfig, StateStoreConfig
    from recsys.data.sequences import load_dataset
    from service.app import create_app
    from service.serve import running_server

    ds = load_dataset(folder, splits=("test",))
    test = ds.splits["test"]
    vocab = ds.vocabulary()

    def raw(dense, field: str) -> list[int]:
        return vocab.raw(np.atleast_1d(dense), field).tolist()

    rng = np.random.default_rng(0)
    first_row = {}  # user -> index of the first row of its first test target
    for i in np.lexsort((test.pos, test.user)):
        first_row.setdefault(int(test.user[i]), i)
    users = sorted(rng.choice(list(first_row), min(10 if small else 50, len(first_row)), replace=False).tolist())

    key = secrets.token_urlsafe(24)
    redis_dir = out / "redis"
    cfg = ServiceConfig(http=HttpConfig(api_key=key, port=0),
                        serve=ServeConfig(state=StateStoreConfig(data_dir=str(redis_dir))),
                        bundle=str(bundle))
    result: dict = {"users": len(users)}
    with running_server(create_app(cfg)) as url, httpx.Client(base_url=url, timeout=60) as client:
        console.print(f"service up at {url} (embedded Redis in {redis_dir})")
        # Stream every selected user's history (events before the first test target) as one event log.
        expected, batches = {}, []
        for u in users:
            r = first_row[u]
            items, cates, ts = ds.store.user_events(u)
            n = int(test.pos[r])
            expected[u] = n
            batches += [{"event_id": f"{u}-{p}", "user_id": u, "item_id": i, "category_id": c, "action": 0,
                         "ts": int(ts[p]) * 1000} for p, i, c in zip(range(n), raw(items[:n], "item"), raw(cates[:n], "cate"))]
        t = time.perf_counter()
        for a in range(0, len(batches), 1000):
            while True:
                r = client.post("/v1/events", json={"events": batches[a:a + 1000]}, headers={"X-API-Key": key})
                if r.status_code != 429:  # backpressure: the stream backlog is full, retry as told
                    break
                time.sleep(float(r.headers.get("retry-after", "1")))
            r.raise_for_status()
        _wait_applied(client, users, expected)
        ingest_s = time.perf_counter() - t
        result |= {"events_streamed": len(batches), "events_applied": sum(expected.values()),
                   "ingest_events_per_s": round(len(batches) / ingest_s)}
        console.print(f"streamed {len(batches):,} events for {len(users)} users: {len(batches) / ingest_s:,.0f} events/s")

        # Online vs offline on the same rows: the first test target of each user (positive + negatives).
        diffs, rows_all = [], []
        for u in users:
            r0 = first_row[u]
            rows = np.flatnonzero((test.user == u) & (test.pos == test.pos[r0]))
            rows_all.append(rows)
            cands = [{"item_id": i, "category_id": c} for i, c in zip(raw(test.item[rows], "item"), raw(test.cate[rows], "cate"))]
            live = client.post("/v1/score", json={"user_id": u, "candidates": cands}).json()["scores"]
            diffs.append(np.abs(np.asarray(live) - _offline_scores(bundle, ds, rows)).max())
        result["parity_max_abs_diff"] = float(max(diffs))
        console.print(f"online vs offline scores on {len(users)} users' test targets: max |diff| = {max(diffs):.2e}")

        # Latency: C = 100 random candidates for random streamed users, one client.
        n_req = 50 if small else 300
        lat = []
        for _ in range(n_req):
            u = int(rng.choice(users))
            items = rng.integers(1, vocab.n_items, 100)
            cands = [{"item_id": i} for i in raw(items, "item")]  # the category from the bundle's vocabulary
            t = time.perf_counter()
            client.post("/v1/score", json={"user_id": u, "candidates": cands}).raise_for_status()
            lat.append((time.perf_counter() - t) * 1e3)
        result |= {"latency_ms": lat, "latency_percentiles_ms": _percentiles(lat),
                   "qps": round(1e3 / statistics.mean(lat), 1), "latency_candidates": 100}
        console.print(f"POST /v1/score, C = 100, one client: {json.dumps(result['latency_percentiles_ms'])} ms")

        # Explanation for a sample user: what the search retrieved for the positive candidate. On synthetic
        # data, a user whose positive has evidence inside the searched window, so the plot can show it.
        u, i = users[0], int(rows_all[0][test.label[rows_all[0]].argmax()])
        if test.evidence is not None:
            from recsys.bundle import load_bundle

            L = load_bundle(bundle).config.model.max_len
            for uu, rows in zip(users, rows_all):
                reach = [r for r in rows if len(test.evidence[r]) and test.evidence[r][-1] >= test.pos[r] - L]
                if reach:
                    u, i = uu, int(reach[0])
                    break
        body = {"user_id": u, "candidates": [{"item_id": raw(test.item[i], "item")[0], "category_id": raw(test.cate[i], "cate")[0]}],
                "explain": True}
        ex = client.post("/v1/score", json=body).json()
        events = (ex.get("explanations") or [[]])[0]
        result["explanation"] = {"user_id": u, "candidate_item": raw(test.item[i], "item")[0], "score": ex["scores"][0],
                                 "events": _with_weights(bundle, ds, i, events)}
    (out / "service.json").write_text(json.dumps(result, indent=2))
    return {k: v for k, v in result.items() if k != "latency_ms"}


def _with_weights(bundle: Path, ds, row: int, events: list[dict]) -> list[dict]:
    """Attach the target-attention weight of each retrieved event (softmax over the kept search scores)."""
    from recsys.bundle import load_bundle
    from recsys.data.sequences import assemble

    b = load_bundle(bundle)
    if not events or not hasattr(b.model, "attention_weights"):
        return events
    batch = assemble(ds.store, ds.splits["test"], np.array([row]), b.config.model.max_len)
    with torch.no_grad():
        w = b.model.attention_weights(batch)[0].tolist()  # [k], in retrieval order
    s = ds.splits["test"]
    ev = set(s.evidence[row].tolist()) if s.evidence is not None else set()
    # position 1 = the most recent event before the target: sequence position pos - position
    return [e | {"weight": float(w[j]), "evidence": int(s.pos[row]) - int(e["position"]) in ev}
            for j, e in enumerate(events) if j < len(w)]
