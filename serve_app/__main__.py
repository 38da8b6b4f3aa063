"""Run the app on a local, loopback-only Ray cluster: ``python -m serve_app [ARG=VALUE ...]``.

The arguments are `serve_app.app.build_app`'s, as for ``serve run serve_app.app:build_app``
(``config=PATH``, dotted overrides such as ``engine.time_scale=0.1``); ``python -m serve_app --help``
prints them and every config key with its type, default and description (`usage`; no Ray is
imported for it).  Unlike a bare
``serve run`` (whose local cluster binds the machine's address), this starts a closed Ray cluster
and no dashboard, serves HTTP on the config's ``http.host``/``http.port`` (default
127.0.0.1:8000), exports Prometheus metrics on 127.0.0.1, port ``TIERED_METRICS_EXPORT_PORT``
(default 8080; docs/metrics.md), with Serve's ``request_timeout_s`` from ``http.request_timeout_s``,
blocks until Ctrl-C or SIGTERM, then drains the ingress (`drain`: new requests get 503, streams in
flight get ``http.drain_timeout_s`` to finish, then an error event and ``[DONE]``) and shuts Serve
and Ray down.  On an existing Ray cluster use ``serve run serve_app.app:build_app ...`` (or
KubeRay's serveConfigV2).

The cluster is closed: every port it opens listens on loopback only (`serve_app.ray_loopback`).
``ray.init(_node_ip_address="127.0.0.1")`` alone does not do it: Ray turns a loopback node IP into
the machine's reachable address, and then its GCS, raylet, worker and agent gRPC ports and the
Prometheus exporter listen on every interface.  So, before anything imports Ray, the launcher sets
Ray's local-only switch ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray reads it once, at import; its
processes inherit it): the node IP stays 127.0.0.1 and Ray binds 127.0.0.1; the job's setup hook
keeps the Serve replicas' inter-deployment gRPC servers (hard-coded ``[::]``) on 127.0.0.1 too, and
the launcher checks the node IP and GCS address once the cluster is up.  With ``ingress.haproxy``
the cluster starts with Ray's ``RAY_SERVE_ENABLE_HA_PROXY=1`` (HAProxy in place of Serve's Python
HTTP proxy), its files in a private folder and its stats and Prometheus ports on 127.0.0.1 too
(`serve_app.ray_loopback.haproxy_env`).  There is no separate bind
address for the metrics exporter in Ray 2.60 (it binds 127.0.0.1 exactly when the node IP is
loopback), so no ``TIERED_METRICS_EXPORT_HOST``: scrape it from this machine, or use KubeRay.

API keys stay out of the cluster's environments: the launcher reads the variable the config's
``api_keys.env`` names (``TIERED_API_KEYS``) itself, checks the keys, hands the app only their
SHA-256 digests (``api_keys.hashes``, with ``api_keys.env`` cleared) and removes the variable from
its own environment before Ray starts, so no Ray process (GCS, raylet, agents, workers, the Serve
controller, proxy and replicas) inherits it; the value is blanked in this process's original
environment block too, which is what ``/proc/PID/environ`` shows (`blank_initial_environ`).  Keys in
``api_keys.file`` stay in the file (the ingress re-reads it when it changes).

Ray's token authentication stays on as well (`serve_app.ray_auth`).  With nothing
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

import ctypes
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any

from serve_app.ray_loopback import haproxy_env, is_local_only, local_only, require_loopback, runtime_env

HELP_FLAGS = ("-h", "--help")

USAGE = """\
usage: python -m serve_app [config=PATH] [DOTTED.KEY=VALUE ...]
                           [max_context_tokens=N] [ingress_num_cpus=X]
       python -m serve_app --help

Runs the tier-aware, OpenAI-compatible app (serve_app.app:build_app) on a closed local Ray cluster:
every Ray port on 127.0.0.1, Ray token authentication on (a private token, removed on exit), no
dashboard.  HTTP on the config's http.host:http.port (default 127.0.0.1:8000), Prometheus metrics on
127.0.0.1:$TIERED_METRICS_EXPORT_PORT (default 8080).  Runs until Ctrl-C or SIGTERM, then drains
(new requests 503, streams in flight get http.drain_timeout_s) and stops Serve and Ray.  On an
existing Ray cluster: serve run serve_app.app:build_app [the same ARG=VALUE ...], or KubeRay.

Arguments are ARG=VALUE pairs, as for serve run:
  config=PATH           the app config YAML (default {default_config}; the others in
                        {configs_dir}: {configs})
  DOTTED.KEY=VALUE      sets one config key below, before validation; VALUE is read as YAML
                        (engine.time_scale=0.1  replicas.num_replicas=2  tiers.0.tbt_slo_s=0.2
                        'tiers.1.key_limits={{requests_per_minute: 60}}'); tiers.N is the config's
                        N-th tier (from 0, an existing one), KEY a mapping key
  max_context_tokens=N  prompt + completion tokens the ingress accepts per request (default: vllm's
                        engine.max_model_len, else the model's max_position_embeddings, else 8192)
  ingress_num_cpus=X    the same as ingress.num_cpus=X: Ray CPUs each ingress replica reserves

API keys (never in the config): TIERED_API_KEYS='KEY:TIER,KEY:TIER' (the variable api_keys.env
names; the launcher hands the app their SHA-256 digests only), api_keys.file or api_keys.hashes.
Clients send "Authorization: Bearer KEY"; the key picks the tier.

Config keys (serve_app.config.AppConfig: type, default, constraints, description).  The defaults
are the schema's; a config file's values replace them (the default config, {default_name}, sets
most sections).  The engine section is one of two variants, chosen by engine.backend (sim: the
simulated engine; vllm: vLLM with the SLAI scheduler).
"""


def usage() -> str:
    """``python -m serve_app --help``: what the launcher does, its ARG=VALUE syntax and every
    config key (`serve_app.field_help`, from the pydantic models).  Imports no Ray."""
    from serve_app.config import CONFIGS_DIR, DEFAULT_CONFIG_PATH, AppConfig
    from serve_app.field_help import field_help

    def rel(p: Any) -> str:
        try:
            return str(p.relative_to(os.getcwd()))
        except ValueError:
            return str(p)

    head = USAGE.format(default_config=rel(DEFAULT_CONFIG_PATH), configs_dir=rel(CONFIGS_DIR),
                        configs=", ".join(sorted(p.name for p in CONFIGS_DIR.glob("*.yaml")
                                              if p != DEFAULT_CONFIG_PATH)),
                        default_name=DEFAULT_CONFIG_PATH.name)
    keys = field_help(AppConfig, list_item=".N", mapping_key=".KEY", factory_defaults=True)
    return head + "\n" + "\n".join(keys) + "\n"


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


if __name__ == "__main__":  # python -m serve_app
    if wants_help(sys.argv[1:]):  # the usage only: Ray is not even imported
        sys.stdout.write(usage())
        sys.exit(0)
    local_only()  # Ray's local-only switch before anything imports Ray

from serve_app.app import build_app, cli_value  # noqa: E402 (imports Ray)
from serve_app.auth import KeyConfigError, hashed_env_keys  # noqa: E402
from serve_app.config import DEFAULT_CONFIG_PATH, AppConfig, load_config  # noqa: E402
from serve_app.ray_auth import existing_token, private_token, require_enabled, require_token_mode  # noqa: E402


def parse_args(argv: list[str]) -> dict[str, str]:
    args = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or not key:
            raise SystemExit(f"python -m serve_app: expected ARG=VALUE, got {a!r} (e.g. config=serve_app/configs/sim.yaml "
                             f"or engine.time_scale=0.1; python -m serve_app --help lists them)")
        args[key] = value
    return args


def blank_initial_environ(name: str) -> bool:
    """Overwrite the value of ``name`` in this process's original environment block, the one the
    kernel shows as ``/proc/PID/environ`` (``unsetenv``, i.e. ``os.environ.pop``, only drops libc's
    pointer to it).  Call it before removing the variable.  Best effort (glibc's ``environ``):
    returns whether a value was blanked."""
    try:
        environ = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
    except (OSError, ValueError, AttributeError):
        return False
    prefix, blanked, i = name.encode() + b"=", False, 0
    while environ[i]:
        entry = ctypes.string_at(environ[i])
        if entry.startswith(prefix) and len(entry) > len(prefix):
            ctypes.memset(environ[i] + len(prefix), ord("*"), len(entry) - len(prefix))
            blanked = True
        i += 1
    return blanked


def hash_env_keys(config: AppConfig, environ: Any = None) -> dict[str, Any]:
    """Build_app overrides that carry the keys of ``config.api_keys.env``'s variable as digests
    (`serve_app.auth.hashed_env_keys`: ``api_keys.hashes``, ``api_keys.env: null``), ``{}`` when it is
    unset or empty; removes the variable from ``environ`` (default ``os.environ``, blanked in place first:
    `blank_initial_environ`).  SystemExit for a bad key (the message names the entry, never a key)."""
    environ = os.environ if environ is None else environ
    var = config.api_keys.env
    if var is None or var not in environ:
        return {}
    try:
        hashes = hashed_env_keys(config, environ)
    except KeyConfigError as e:
        raise SystemExit(f"python -m serve_app: {e}") from None
    if environ is os.environ:
        blank_initial_environ(var)
    del environ[var]
    if not hashes:  # an empty variable: no keys to hand over (the ingress says so if none are left)
        return {}
    return {"api_keys.hashes": hashes, "api_keys.env": None}


APP_NAME = "default"


def drain(timeout_s: float) -> None:
    """Before Serve shuts down: every ingress replica stops admitting (503) and gives the requests in
    flight up to ``timeout_s`` to finish, then ends the streams still open with an error event and
    ``[DONE]`` (`serve_app.ingress.Ingress.drain`).  Best effort: a failure is reported, and the
    shutdown goes on."""
    from ray import serve

    print(f"serve_app: draining (new requests get 503; streams in flight have up to {timeout_s:g} s)", flush=True)
    try:
        handle = serve.get_deployment_handle("Ingress", app_name=APP_NAME)
        results = handle.broadcast("drain", timeout_s).results(timeout_s=timeout_s + 10, return_exceptions=True)
    except Exception as e:  # noqa: BLE001 - the app may be gone already
        print(f"serve_app: draining failed: {e!r}", flush=True)
        return
    for r in results:
        if isinstance(r, BaseException):
            print(f"serve_app: an ingress replica did not drain: {r!r}", flush=True)
        else:
            print(f"serve_app: drained: {r['finished']} of {r['in_flight']} requests finished, {r['ended']} ended",
                  flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        sys.stdout.write(usage())
        return 0
    args = parse_args(argv)
    try:  # Ray token authentication stays on (module docstring)
        require_token_mode()
        existing_token()  # a RAY_AUTH_TOKEN_PATH that names no token is refused
    except RuntimeError as e:
        raise SystemExit(f"python -m serve_app: {e}") from None
    app = build_app(args)  # validates the config before anything starts
    overrides = {k: cli_value(v) for k, v in args.items() if "." in k}  # as build_app reads them (YAML)
    config = load_config(args.get("config") or DEFAULT_CONFIG_PATH, overrides=overrides)
    http = config.http
    key_overrides = hash_env_keys(config)  # the keys' digests only, the variable gone (module docstring)
    if key_overrides:
        app = build_app({**args, **key_overrides})
        print(f"serve_app: the API keys in {config.api_keys.env} go to the app as SHA-256 digests only "
              f"({len(key_overrides['api_keys.hashes'])} keys with api_keys.hashes); the variable is removed "
              f"before Ray starts", flush=True)
    if not is_local_only():  # main() called in a process that imported Ray before local_only()
        raise SystemExit("python -m serve_app: Ray was imported without its local-only switch, so the cluster "
                         "would listen on every interface (serve_app/ray_loopback.py); run python -m serve_app")

    import ray
    from ray import serve

    stop = threading.Event()
    metrics_port = int(os.environ.get("TIERED_METRICS_EXPORT_PORT", "8080"))  # Prometheus scrapes /metrics here
    if not os.environ.get("RAY_TMPDIR"):  # short: Ray's socket paths have a length limit
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="serve_app-", dir="/tmp" if os.path.isdir("/tmp") else None)
    haproxy_dir = None
    if config.ingress.haproxy:  # Ray's processes read it at import: before the cluster starts
        # short: HAProxy adds the node id (56 characters) to the path, and its sockets' paths have 97 at most
        haproxy_dir = tempfile.mkdtemp(prefix="hap-", dir="/tmp" if os.path.isdir("/tmp") else None)
        os.environ.update(haproxy_env(haproxy_dir))
        print(f"serve_app: ingress.haproxy: HAProxy replaces Serve's Python HTTP proxy (RAY_SERVE_ENABLE_HA_PROXY=1; "
              f"its files in {haproxy_dir}, removed on exit)", flush=True)
    with private_token(keep_existing=True, prefix="serve_app-auth-") as token_path:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, _metrics_export_port=metrics_port,
                 runtime_env=runtime_env())  # the closed cluster's setup hook (serve_app.ray_loopback)
        try:
            # after ray.init, whose own SIGTERM handler kills the node's processes and exits at once
            # (Serve's shutdown then aborts on a dead cluster, leaving Ray's agents behind)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            require_enabled()  # Ray turned token authentication on for the cluster
            require_loopback()  # and the node IP stayed 127.0.0.1
            gcs = ray.get_runtime_context().gcs_address
            print("serve_app: Ray token authentication is on; " + (
                f"this cluster's token is in {token_path} (removed on exit): Ray's CLI needs it, e.g. "
                f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_path} ray status --address {gcs}" if token_path else
                f"with the token given in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (GCS at {gcs})")
                + f"; Ray's logs: {os.environ['RAY_TMPDIR']}", flush=True)
            serve.start(http_options={"host": http.host, "port": http.port,
                                      "request_timeout_s": http.request_timeout_s})
            serve.run(app, name=APP_NAME, route_prefix="/")
            print(f"serve_app: ready on http://{http.host}:{http.port}/ (Ctrl-C stops it)", flush=True)
            stop.wait()
            drain(http.drain_timeout_s)
        finally:
            print("serve_app: shutting down", flush=True)
            serve.shutdown()
            ray.shutdown()
            if haproxy_dir is not None:
                shutil.rmtree(haproxy_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
