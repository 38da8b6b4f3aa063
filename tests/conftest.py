"""Shared fixtures."""

import atexit
import os
import secrets
import sys
from pathlib import Path

import pytest

from serve_app.ray_loopback import LOCAL_ONLY
from loadtest.ports import free_port as _free_port

# Ray's local-only switch, before any test module imports Ray (Ray reads it once, at import): the
# session's local clusters listen on 127.0.0.1 only (serve_app/ray_loopback.py); `local_serve` checks it.
os.environ[LOCAL_ONLY] = "0"


@pytest.fixture(scope="session")
def ray_token():
    """Ray token authentication for the session's local Ray clusters: a token of this session's own
    (`serve_app.ray_auth.private_token`: mode 0600 in a fresh 0700 temp dir) in ``RAY_AUTH_TOKEN_PATH``
    for this process and what it starts (the clusters' GCS, raylets and workers inherit it), and
    ``RAY_AUTH_MODE`` unset (then ``ray.init`` sets it to token) or token, else the session errors;
    yields the token file's path; restores the environment after."""
    from serve_app.ray_auth import private_token

    with private_token(os.environ, prefix="pytest-ray-auth-") as path:
        yield path


def assert_ray_refuses_unauthenticated(ray, token_path) -> None:
    """The running cluster (this process's driver's) enforces token authentication: its GCS and its
    raylets answer a gRPC call without a token, or with a wrong one, UNAUTHENTICATED, and the same call
    with the cluster's token (``token_path``'s) goes through."""
    import grpc
    from ray.core.generated import gcs_service_pb2 as gcs
    from ray.core.generated import gcs_service_pb2_grpc as gcs_grpc
    from ray.core.generated import node_manager_pb2 as nm
    from ray.core.generated import node_manager_pb2_grpc as nm_grpc

    def gcs_call(channel, metadata):
        gcs_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs.GetClusterIdRequest(), metadata=metadata, timeout=10)

    def raylet_call(channel, metadata):
        nm_grpc.NodeManagerServiceStub(channel).GetResourceLoad(nm.GetResourceLoadRequest(), metadata=metadata,
                                                                timeout=10)

    assert os.environ.get("RAY_AUTH_MODE") == "token"
    token = Path(token_path).read_text().strip()
    targets = [(ray.get_runtime_context().gcs_address, gcs_call)]
    targets += [(f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}", raylet_call) for n in ray.nodes() if n["Alive"]]
    assert len(targets) >= 2
    for address, call in targets:
        with grpc.insecure_channel(address) as channel:
            for metadata in ((), (("authorization", f"Bearer {secrets.token_hex(32)}"),)):
                with pytest.raises(grpc.RpcError) as refused:
                    call(channel, metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (address, refused.value)
            call(channel, (("authorization", f"Bearer {token}"),))


@pytest.fixture(scope="session")
def check_ray_auth(ray_token):
    """`assert_ray_refuses_unauthenticated` with the session's token: ``check_ray_auth(ray)`` once this
    process's driver is connected to a cluster it started."""
    return lambda ray: assert_ray_refuses_unauthenticated(ray, ray_token)


@pytest.fixture(scope="module")
def local_serve(request, tmp_path_factory, check_ray_auth):
    """A local Ray cluster and Serve bound to 127.0.0.1 for one test module; yields the HTTP port.

    The cluster is closed (`serve_app.ray_loopback`: node IP 127.0.0.1, every Ray port on loopback,
    checked) and Ray's token authentication is on, with the session's token (`ray_token`), and checked
    (`check_ray_auth`). A module may set `SERVE_ENV_VARS` (a dict) for the
    cluster's workers. Everything is shut down after the module."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from serve_app.ray_loopback import require_loopback, runtime_env

    ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False,
             runtime_env=runtime_env(getattr(request.module, "SERVE_ENV_VARS", {})))
    try:
        require_loopback()
        check_ray_auth(ray)
        yield _start_serve(serve)
    finally:
        serve.shutdown()
        ray.shutdown()


def _start_serve(serve, attempts: int = 3) -> int:
    """``serve.start`` on a free loopback port; the port is free when chosen, but a Ray process may
    take it before Serve's proxy binds it (seen in CI: "Failed to bind to address"): then again
    on another port."""
    for attempt in range(attempts):
        port = _free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return port
        except Exception as e:  # noqa: BLE001 - Ray wraps the proxy's bind error in a RayTaskError
            if "Failed to bind" not in str(e) or attempt == attempts - 1:
                raise
            serve.shutdown()
    raise AssertionError("unreachable")


# --- How the test process ends -------------------------------------------------------------------
# A CI run once died with SIGSEGV (exit 139) after all 2,428 tests had passed and pytest had printed
# its summary: in the interpreter's teardown, where the native libraries the suite loads into this
# one process (torch and an in-process vLLM engine, Ray's core worker and Serve's router thread,
# gRPC, uvloop) are torn down in whatever order their module globals and C++ statics fall. A full
# local run with core dumps on did not reproduce it. The outcome is settled by then, so the process
# ends the way a finished test run should: pytest's own unconfigure hooks run, then the atexit
# handlers (Ray's shutdown, pytest's temp-dir locks), then the process exits with pytest's status
# without that teardown. TESTS_FULL_TEARDOWN=1 keeps the ordinary interpreter exit (to study it).
FULL_TEARDOWN_ENV = "TESTS_FULL_TEARDOWN"
_session = None


def pytest_sessionstart(session):
    global _session
    _session = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _session is None or _session.config is not config or os.environ.get(FULL_TEARDOWN_ENV) == "1":
        return
    exit_status = int(_session.exitstatus)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(exit_status)
