"""Loopback networking helpers."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; a later bind can still race for it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray (2.60) has no bind-address option. Its servers listen on loopback only when the node's address is
# exactly 127.0.0.1 (GCS, raylet, object manager: the C++ gRPC servers' listen_to_localhost_only; dashboard
# agent, runtime-env agent, metrics exporter: the node IP), but ray.init turns a loopback `_node_ip_address`
# back into the machine's network address (services.resolve_ip_for_localhost) unless "cluster mode" is off,
# which is what this variable does (on Linux it defaults to on); the Ray processes inherit it.
RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_loopback_only() -> dict:
    """Switch this process (and the Ray processes it starts) to a loopback-only local Ray -> the extra
    ray.init arguments that bind it to 127.0.0.1. Used by the pipelines' Ray and by Ray Serve."""
    os.environ[RAY_LOCAL_ONLY_ENV] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the variable was set
    return {"_node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1"}
