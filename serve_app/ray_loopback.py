"""A closed local Ray cluster: every port the local clusters this project starts listen on loopback only.

Why ``ray.init(_node_ip_address="127.0.0.1")`` is not enough (Ray 2.60): ``ray.init`` passes the
requested node IP through ``ray._private.services.resolve_ip_for_localhost``, which turns
``127.0.0.1``/``localhost``/``::1`` into the machine's reachable address; Ray's gRPC servers (GCS,
raylet node and object managers, every worker's core worker, the dashboard and runtime-env agents)
bind all interfaces unless the node IP *is* the loopback address, and the Prometheus exporter of
the metrics agent binds ``127.0.0.1`` only when the node IP is loopback, else every interface.

Ray's own switch for a local-only cluster is the environment variable
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``; default on
for Linux, off on Windows/macOS).  Off (``0``), ``resolve_ip_for_localhost`` keeps the loopback
address, so the node IP is ``127.0.0.1`` and all of the above bind ``127.0.0.1``, and no other node
can join (``ray start --address`` refuses).  Ray reads it once, when ``ray`` is first imported, so
`local_only` must run before that (it refuses otherwise); the processes the cluster starts inherit
it.  No cleaner option exists in Ray 2.60: ``ray.init``/``ray start`` take no bind address, the
node-IP argument is always resolved as above, and the exporter's address follows the node IP only
(``ray.dashboard.modules.reporter.reporter_agent``: ``address=get_localhost_ip() if
is_localhost(self._ip) else ""``), so there is no separate host for the metrics port either.

One listener ignores the node IP: every Serve replica's inter-deployment gRPC server
(``ray.serve._private.replica``: ``add_port_to_grpc_server(self._server, "[::]:0")``, hard-coded;
it carries Ray's token-auth interceptor, but listens on every interface).  `runtime_env` adds
`bind_wildcards_to_loopback` as the job's ``worker_process_setup_hook``: in each worker of a
local-only cluster it makes that helper bind a wildcard address (``[::]``, ``0.0.0.0``) on
``127.0.0.1`` instead (the replica's callers dial ``NODE_IP:PORT``, i.e. 127.0.0.1); anywhere else
(a KubeRay cluster) it changes nothing.

HAProxy (``ingress.haproxy``; Ray 2.60's ``RAY_SERVE_ENABLE_HA_PROXY=1``) adds listeners that
ignore the node IP too: its config template (``ray.serve._private.haproxy_templates``) binds the
Prometheus exporter (``bind :9101``) and the stats page (``bind *:8404``) on every interface, and
keeps its files, among them an admin socket of mode 666, in the shared ``/tmp/haproxy-serve``.
`haproxy_env` moves the files into a private 0700 folder; the setup hook, where that variable is
set, rewrites those two binds to 127.0.0.1 (in the HAProxy manager, a worker of the job, before
it renders the config).  The HTTP frontend binds ``http.host`` (127.0.0.1), and so do the ingress
replicas' direct-ingress ports and the fallback Python proxy.

`require_loopback` checks, once the cluster is up, that the node IP and the GCS address are
loopback; ``tests/serve_app/test_closed_cluster.py`` checks every listening socket of a launch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
HAPROXY = "RAY_SERVE_ENABLE_HA_PROXY"  # Ray 2.60: HAProxy instead of Serve's Python HTTP proxy
# Ray 2.60's HAProxy config template binds these on every interface (ray.serve._private.haproxy_templates)
_HAPROXY_WILDCARD_BINDS = {"bind :{{ config.metrics_port }}": "bind 127.0.0.1:{{ config.metrics_port }}",
                           "bind *:{{ config.stats_port }}": "bind 127.0.0.1:{{ config.stats_port }}"}
SETUP_HOOK = "serve_app.ray_loopback.bind_wildcards_to_loopback"
LOOPBACK_V4 = "127.0.0.1"
_WILDCARD_HOSTS = ("[::]", "0.0.0.0", "[::0]", "")


def local_only(env: MutableMapping[str, str] | None = None) -> None:
    """Turn Ray's local-only switch on in ``env`` (default ``os.environ``: this process and what it
    starts): ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``.  Raises RuntimeError where this process has
    already imported Ray with the switch off (Ray read the variable at import; too late)."""
    env = os.environ if env is None else env
    env[LOCAL_ONLY] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if env is os.environ and constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        raise RuntimeError(f"Ray was imported before {LOCAL_ONLY}=0 was set, so a local cluster started "
                           f"here would listen on every interface; set it before importing ray "
                           f"(serve_app/ray_loopback.py)")


def is_local_only() -> bool:
    """Whether this process's Ray (imported here) runs local-only clusters."""
    from ray._private import ray_constants

    return not ray_constants.ENABLE_RAY_CLUSTER


def runtime_env(env_vars: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The job ``runtime_env`` for ``ray.init`` of a local-only cluster: ``env_vars`` and the setup
    hook `bind_wildcards_to_loopback` (module docstring)."""
    return {"env_vars": dict(env_vars or {}), "worker_process_setup_hook": SETUP_HOOK}


def haproxy_env(private_dir: str) -> dict[str, str]:
    """The environment that turns HAProxy on for a cluster started here (Ray reads it at import,
    so set it before ``ray.init``; its processes inherit it), with HAProxy's files (config, admin
    socket, server state, metrics socket) in ``private_dir`` (a 0700 folder of this launch)."""
    return {HAPROXY: "1",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(private_dir, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(private_dir, "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": private_dir,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(private_dir, "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(private_dir, "metrics.sock")}


def bind_haproxy_to_loopback() -> None:
    """Rewrite Ray's HAProxy config template so that its Prometheus exporter and stats page bind
    127.0.0.1 (module docstring); RuntimeError if the template no longer has those binds."""
    from ray.serve._private import haproxy

    template = haproxy.HAPROXY_CONFIG_TEMPLATE
    for wildcard, loopback in _HAPROXY_WILDCARD_BINDS.items():
        if wildcard not in template and loopback not in template:
            raise RuntimeError(f"Ray's HAProxy config template has no {wildcard!r}: the closed cluster cannot keep "
                               "HAProxy on loopback (serve_app/ray_loopback.py)")
        template = template.replace(wildcard, loopback)
    haproxy.HAPROXY_CONFIG_TEMPLATE = template


def _loopback_address(address: str) -> str:
    """``[::]:PORT`` / ``0.0.0.0:PORT`` -> ``127.0.0.1:PORT``; any other address unchanged."""
    host, sep, port = address.rpartition(":")
    return f"{LOOPBACK_V4}:{port}" if sep and host in _WILDCARD_HOSTS else address


def bind_wildcards_to_loopback() -> None:
    """Ray ``worker_process_setup_hook`` (runs in every worker of the job before its first task):
    in a local-only cluster (`is_local_only`, inherited from the launcher), make Ray's
    ``add_port_to_grpc_server`` bind wildcard addresses on 127.0.0.1 (the Serve replica's
    inter-deployment gRPC server); elsewhere do nothing."""
    if not is_local_only():
        return
    if os.environ.get(HAPROXY) == "1":
        bind_haproxy_to_loopback()
    from ray._common import tls_utils

    real = tls_utils.add_port_to_grpc_server
    if getattr(real, "_loopback", False):
        return

    def add_port_on_loopback(server: Any, address: str) -> int:
        return real(server, _loopback_address(address))

    add_port_on_loopback._loopback = True  # type: ignore[attr-defined]
    tls_utils.add_port_to_grpc_server = add_port_on_loopback
    # the replica module binds the name at import: patch it there too if it is already loaded
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None and hasattr(replica, "add_port_to_grpc_server"):
        replica.add_port_to_grpc_server = add_port_on_loopback


def require_loopback() -> None:
    """Raise RuntimeError unless this process's driver is connected to a cluster whose node IP and
    GCS address are loopback (after ``ray.init``)."""
    import ray

    node_ip = ray.util.get_node_ip_address()
    gcs_host = ray.get_runtime_context().gcs_address.rpartition(":")[0].strip("[]")
    if node_ip != LOOPBACK_V4 or gcs_host != LOOPBACK_V4:
        raise RuntimeError(f"the Ray cluster is not loopback-only (node IP {node_ip}, GCS at {gcs_host}): "
                           f"{LOCAL_ONLY}=0 must be set before ray is imported (serve_app/ray_loopback.py)")
