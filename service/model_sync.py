"""One model version across processes: `POST /v1/admin/reload` reaches one process, the others follow.

The process that handles a reload loads (and rebuilds for) the new bundle, then publishes it: `SET
<prefix>{m}:desired` = {bundle, version}. Every serving process (each uvicorn worker, each Ray Serve replica)
and every `recsys stream-worker` polls that key every `reload_poll_s` (one GET) and, when the version differs
from its own, loads the bundle from the published path (every process must see the same filesystem path),
checks that it is the published version, and switches. Each also reports what it serves in the hash
`<prefix>{m}:served` (process -> {version, ts}), which is how an operator (and the test) sees convergence:
`ModelSync.served(max_age_s)` keeps the processes that reported recently.

A bundle that fails to load, or loads as another version than published, is logged and not retried until
another version is published; the process keeps serving its current model.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Callable

import redis

from service.keys import KeySpace

log = logging.getLogger("recsys.service")


class ModelSync:
    def __init__(self, client: redis.Redis, key_prefix: str, role: str):
        keys = KeySpace(key_prefix)
        self.client = client
        self.desired_key = keys.model_desired
        self.served_key = keys.model_served
        self.member = f"{socket.gethostname()}:{os.getpid()}:{role}"
        self._failed: set[str] = set()  # published versions whose bundle did not load as that version

    def publish(self, bundle: str, version: str) -> None:
        self.client.set(self.desired_key, json.dumps({"bundle": bundle, "version": version, "ts": time.time()}))

    def desired(self) -> dict | None:
        raw = self.client.get(self.desired_key)
        return None if raw is None else json.loads(raw)

    def report(self, version: str | None) -> None:
        self.client.hset(self.served_key, self.member, json.dumps({"version": version, "ts": time.time()}))

    def forget(self) -> None:
        self.client.hdel(self.served_key, self.member)

    def served(self, max_age_s: float = 10.0) -> dict[str, str | None]:
        """process -> version, for the processes that reported within `max_age_s`."""
        now = time.time()
        out = {}
        for member, raw in self.client.hgetall(self.served_key).items():
            v = json.loads(raw)
            if now - v["ts"] <= max_age_s:
                out[member.decode()] = v["version"]
        return out

    def follow(self, current: str | None):
        """-> the published model, loaded, when its version differs from `current`; else None."""
        from service.model_state import ServingModel

        d = self.desired()
        if d is None or d["version"] == current or d["version"] in self._failed:
            return None
        try:
            model = ServingModel.from_bundle(d["bundle"])
        except Exception:  # noqa: BLE001 - a broken or missing bundle: keep serving the current model
            log.exception("model sync: cannot load the published bundle %s (version %s); keeping %s",
                          d["bundle"], d["version"], current)
            self._failed.add(d["version"])
            return None
        if model.version != d["version"]:
            log.error("model sync: %s is version %s, published as %s (changed on disk?); keeping %s",
                      d["bundle"], model.version, d["version"], current)
            self._failed.add(d["version"])
            return None
        log.info("model sync: %s -> %s (%s)", current, model.version, d["bundle"])
        return model


def follow_in_thread(sync: ModelSync, version: str | None, switch: Callable[[object], None],
                     stop: threading.Event, poll_s: float) -> threading.Thread:
    """For processes without an event loop (`recsys stream-worker`): poll, `switch(model)`, report."""

    def loop() -> None:
        current = version
        while not stop.wait(poll_s):
            try:
                model = sync.follow(current)
                if model is not None:
                    switch(model)
                    current = model.version
                sync.report(current)
            except redis.RedisError as e:
                log.warning("model sync: %s", e)
        try:
            sync.forget()
        except redis.RedisError:
            pass

    t = threading.Thread(target=loop, name="model-sync", daemon=True)
    t.start()
    return t
