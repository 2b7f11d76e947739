"""The state store and the stream worker against a real 3-master Redis Cluster.

The cluster is three `redis-server --cluster-enabled yes` processes (the Redis 7 binary on PATH) on free
local ports in a temp dir, slots assigned with CLUSTER ADDSLOTSRANGE; started and removed by the module
fixture (about a second). The store is reached the way a deployment reaches it: `state.cluster: true` and
a `redis://` URL of one node, through `service.redis_conn.connect`.
"""

from __future__ import annotations

import pytest
import redis
from redis.cluster import key_slot

from helpers import pings, start_redis_server, stop, wait_for
from recsys.config.serve import ServeConfig, StateStoreConfig, StreamConfig
from recsys.net import free_port
from service.keys import KeySpace
from service.redis_conn import connect
from service.state import StateStore
from service.stream import EventStream, StreamWorker
from test_state_store import HashChain, check_user, make_events
from test_stream import arrival

SLOTS = 16384


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """-> the URL of one node of a running 3-master cluster with every slot served."""
    base = tmp_path_factory.mktemp("cluster")
    procs, ports = [], []
    try:
        for i in range(3):
            d = base / str(i)
            bus = free_port()  # the default (port + 10000) can exceed 65535
            proc, port = start_redis_server(d, None, "--cluster-enabled", "yes", "--cluster-port", str(bus),
                                            "--cluster-config-file", str(d / "nodes.conf"))
            procs.append(proc)
            ports.append((port, bus))
        nodes = [redis.Redis(port=p) for p, _ in ports]
        assert all(pings(n) for n in nodes)
        bounds = [SLOTS * i // 3 for i in range(4)]
        for i, n in enumerate(nodes):
            n.execute_command("CLUSTER ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
            if i:
                n.execute_command("CLUSTER MEET", "127.0.0.1", *ports[0])
        wait_for(lambda: all(n.cluster("info")["cluster_state"] == "ok"
                             and int(n.cluster("info")["cluster_known_nodes"]) == 3 for n in nodes), "cluster ok")
        for n in nodes:
            n.close()
        yield f"redis://127.0.0.1:{ports[0][0]}/0"
    finally:
        for proc in procs:
            stop(proc)


def test_every_key_of_a_user_and_of_a_partition_shares_one_slot():
    ks = KeySpace("rs:")
    for u in (0, 1, 7, 12345, 2**53 - 1):
        k = ks.user(u)
        assert len({key_slot(x.encode()) for x in (k.meta, k.seq, k.tail, k.dedup, k.state("v1"))}) == 1
    for p in range(8):
        pk = ks.partition(p)
        assert len({key_slot(x.encode()) for x in (pk.events, pk.dead, pk.stats)}) == 1
    # and users do spread over the slots (so over the masters)
    assert len({key_slot(ks.user(u).meta.encode()) for u in range(100)}) > 90


def test_store_and_stream_worker_on_a_cluster(cluster):
    state = StateStoreConfig(redis_url=cluster, cluster=True, key_prefix="c:", seq_cap=50, seq_slack=8)
    cfg = ServeConfig(state=state, stream=StreamConfig(partitions=3, batch_size=64, block_ms=5))
    events = make_events(400, users=12, seed=41)
    with connect(state) as handle:
        client = handle.client
        assert isinstance(client, redis.cluster.RedisCluster)
        masters = {n.name for n in client.get_primaries()}
        assert len(masters) == 3
        # users land on every master, so scripts and reads really span nodes
        owners = {client.get_node_from_key(KeySpace("c:").user(u).meta).name for u in range(12)}
        assert owners == masters

        # the store directly: shuffled, duplicated, replayed batches (fold and rebuild paths, CAS, dedup)
        store = StateStore(client, state)
        sent = arrival(events[:200], 41)
        for i in range(0, len(sent), 23):
            store.apply(HashChain(), sent[i:i + 23])
        # then the stream worker for the rest
        stream = EventStream(client, cfg)
        worker = StreamWorker(cfg, HashChain(), client=client, consumer="c1")
        stream.append(arrival(events[200:], 42))
        worker.run(until_idle=True)
        stream.append(events[:50])  # a replay through the stream: duplicates
        worker.run(until_idle=True)
        assert worker.totals.applied == 200 and worker.totals.duplicates >= 50
        for u in range(12):
            check_user(store, u, events)
        assert stream.backlog() == 0
        assert sorted(store.iter_user_ids()) == list(range(12))
