"""Run the app on a local, loopback-only Ray cluster: ``python -m serve_app [ARG=VALUE ...]``.

The arguments are `serve_app.app.build_app`'s, as for ``serve run serve_app.app:build_app``
(``config=PATH``, dotted overrides such as ``engine.time_scale=0.1``).  Unlike a bare
``serve run`` (whose local cluster binds the machine's address), this starts Ray with node IP
127.0.0.1 requested and no dashboard, serves HTTP on the config's ``http.host``/``http.port``
(default 127.0.0.1:8000), exports Prometheus metrics on port ``TIERED_METRICS_EXPORT_PORT``
(default 8080; docs/metrics.md), blocks until Ctrl-C or SIGTERM, then shuts Serve and Ray down.  On an
existing Ray cluster use ``serve run serve_app.app:build_app ...`` (or KubeRay's serveConfigV2).

Ray's token authentication stays on (`serve_app.ray_auth`); it matters even here: Ray's GCS,
raylet, worker and metrics ports listen on every interface whatever the node IP.  With nothing
configured, each launch generates a token of its own (256 random bits, file mode 0600, in a fresh
0700 directory under the temp dir, ``serve_app-auth-*``) and passes it to the cluster's processes as
``RAY_AUTH_TOKEN_PATH`` (Ray sets ``RAY_AUTH_MODE=token``, its default for a new local cluster, and
the launcher checks that it did); it prints where the token is (Ray's CLI needs it: ``RAY_AUTH_MODE=token
RAY_AUTH_TOKEN_PATH=... ray status --address ...``) and removes it on exit.  Not Ray's default
``~/.ray/auth_token``, because Ray writes that with the process umask (usually 0644), shares it with
every local cluster the user ever starts and leaves it behind.  A token already given in
``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` is used instead; ``RAY_AUTH_MODE`` set to anything but
``token`` is refused.  Ray's temp dir (sockets, logs) is ``RAY_TMPDIR`` when set, else a fresh
private ``/tmp/serve_app-*`` (kept after exit for its logs, as Ray's own ``/tmp/ray`` would be).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading

from serve_app.app import build_app
from serve_app.config import DEFAULT_CONFIG_PATH, load_config
from serve_app.ray_auth import existing_token, private_token, require_enabled, require_token_mode


def parse_args(argv: list[str]) -> dict[str, str]:
    args = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or not key:
            raise SystemExit(f"python -m serve_app: expected ARG=VALUE, got {a!r} (e.g. config=serve_app/configs/sim.yaml "
                             f"or engine.time_scale=0.1)")
        args[key] = value
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:  # Ray token authentication stays on (module docstring)
        require_token_mode()
        existing_token()  # a RAY_AUTH_TOKEN_PATH that names no token is refused
    except RuntimeError as e:
        raise SystemExit(f"python -m serve_app: {e}") from None
    app = build_app(args)  # validates the config before anything starts
    overrides = {k: v for k, v in args.items() if "." in k}
    http = load_config(args.get("config") or DEFAULT_CONFIG_PATH, overrides=overrides).http

    import ray
    from ray import serve

    stop = threading.Event()
    metrics_port = int(os.environ.get("TIERED_METRICS_EXPORT_PORT", "8080"))  # Prometheus scrapes /metrics here
    if not os.environ.get("RAY_TMPDIR"):  # short: Ray's socket paths have a length limit
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="serve_app-", dir="/tmp" if os.path.isdir("/tmp") else None)
    with private_token(keep_existing=True, prefix="serve_app-auth-") as token_path:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, _metrics_export_port=metrics_port)
        try:
            # after ray.init, whose own SIGTERM handler kills the node's processes and exits at once
            # (Serve's shutdown then aborts on a dead cluster, leaving Ray's agents behind)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            require_enabled()  # Ray turned token authentication on for the cluster
            gcs = ray.get_runtime_context().gcs_address
            print("serve_app: Ray token authentication is on; " + (
                f"this cluster's token is in {token_path} (removed on exit): Ray's CLI needs it, e.g. "
                f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_path} ray status --address {gcs}" if token_path else
                f"with the token given in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (GCS at {gcs})")
                + f"; Ray's logs: {os.environ['RAY_TMPDIR']}", flush=True)
            serve.start(http_options={"host": http.host, "port": http.port})
            serve.run(app, name="default", route_prefix="/")
            print(f"serve_app: ready on http://{http.host}:{http.port}/ (Ctrl-C stops it)", flush=True)
            stop.wait()
        finally:
            print("serve_app: shutting down", flush=True)
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
