"""Shared fixtures."""

import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_serve(request, tmp_path_factory):
    """A local Ray cluster and Serve bound to 127.0.0.1 for one test module; yields the HTTP port.

    A module may set `SERVE_ENV_VARS` (a dict) for the cluster's workers. Everything is shut down
    after the module."""
    ray = pytest.importorskip("ray")
    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env_vars = {"RAY_AUTH_MODE": "disabled", **getattr(request.module, "SERVE_ENV_VARS", {})}
    port = _free_port()
    ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False,
             runtime_env={"env_vars": env_vars})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
