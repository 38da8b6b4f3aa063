"""Run the app on a local, loopback-only Ray cluster: ``python -m serve_app [ARG=VALUE ...]``.

The arguments are `serve_app.app.build_app`'s, as for ``serve run serve_app.app:build_app``
(``config=PATH``, dotted overrides such as ``engine.time_scale=0.1``).  Unlike a bare
``serve run`` (whose local cluster binds the machine's address), this starts Ray with every
component on 127.0.0.1 and no dashboard, serves HTTP on the config's ``http.host``/``http.port``
(default 127.0.0.1:8000), exports Prometheus metrics on port ``TIERED_METRICS_EXPORT_PORT``
(default 8080; docs/metrics.md), blocks until Ctrl-C or SIGTERM, then shuts Serve and Ray down.  On an
existing Ray cluster use ``serve run serve_app.app:build_app ...`` (or KubeRay's serveConfigV2).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from serve_app.app import build_app
from serve_app.config import DEFAULT_CONFIG_PATH, load_config


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
    app = build_app(args)  # validates the config before anything starts
    overrides = {k: v for k, v in args.items() if "." in k}
    http = load_config(args.get("config") or DEFAULT_CONFIG_PATH, overrides=overrides).http

    import ray
    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only cluster
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    metrics_port = int(os.environ.get("TIERED_METRICS_EXPORT_PORT", "8080"))  # Prometheus scrapes /metrics here
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, _metrics_export_port=metrics_port)
    try:
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
