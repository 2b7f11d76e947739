"""Backup and restore of the embedded state store (scripts/state_backup.py, docs/operations.md): a snapshot taken
while the service's server runs, restored into a fresh folder and over the live folder's old files, reads back
the same sequences, states and revisions through the real StateStore; later writes are not in it."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from recsys.config.serve import StateStoreConfig
from recsys.paths import REPO_ROOT
from service.redis_conn import start_embedded
from service.state import Event, StateStore
from test_state_store import HashChain, make_events

USERS = 20


def _script():
    spec = importlib.util.spec_from_file_location("state_backup", REPO_ROOT / "scripts" / "state_backup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _views(handle):
    store = StateStore(handle.client, StateStoreConfig())
    return store.read_users(list(range(USERS)), HashChain().version)


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.sequence, w.sequence)
        assert g.state == w.state and g.rev == w.rev


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A live store with applied events, backed up while running, then written to again."""
    sb = _script()
    tmp = tmp_path_factory.mktemp("backup")
    live = tmp / "live"
    with start_embedded(live) as service:  # the service process owns the server
        store = StateStore(service.client, StateStoreConfig())
        store.apply(HashChain(), make_events(400, USERS, seed=1))
        want = _views(service)
        assert sum(len(v.sequence) for v in want) == 400 and all(v.state for v in want)
        out = sb.backup(live, tmp / "backups" / "state.rdb")
        store.apply(HashChain(), [Event("after-backup", 0, 7, 3, 0, 20_000)])
        assert _views(service)[0].rev != want[0].rev
    return sb, tmp, live, out, want


def test_restore_into_a_fresh_folder(snapshot):
    sb, tmp, _, out, want = snapshot
    fresh = tmp / "fresh"
    assert sb.restore(out, fresh) > 0
    with start_embedded(fresh) as h:  # the service's default start: AOF on
        _assert_same(_views(h), want)
    with start_embedded(fresh) as h:  # and again: the restored data survived a restart
        _assert_same(_views(h), want)


def test_restore_over_the_live_folder_replaces_newer_data(snapshot):
    sb, _, live, out, want = snapshot
    sb.restore(out, live)
    assert (live / "appendonly.aof.before-restore").is_file()
    with start_embedded(live) as h:
        _assert_same(_views(h), want)  # the event written after the backup is gone


def test_restore_refuses_a_running_server(snapshot):
    sb, tmp, _, out, _ = snapshot
    running = tmp / "running"
    with start_embedded(running):
        with pytest.raises(RuntimeError, match="stop the service first"):
            sb.restore(out, running)


def test_copying_the_rdb_alone_loses_everything(snapshot):
    """Why restore is a script: with the AOF on, Redis ignores a copied RDB and starts empty."""
    _, tmp, _, out, _ = snapshot
    naive = tmp / "naive"
    naive.mkdir()
    shutil.copyfile(out, naive / "state.rdb")
    with start_embedded(naive) as h:
        assert h.client.dbsize() == 0
