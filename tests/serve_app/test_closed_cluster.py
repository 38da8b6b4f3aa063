"""The cluster is closed: everything ``bash .ci/start`` (``python -m serve_app``) launches listens on
loopback only, no process of it has the API keys in its environment (the launcher hands the app
their digests), and SIGTERM to the launcher leaves nothing it started behind.

One launch of the app per HTTP front (Serve's Python proxy, and HAProxy: ``ingress.haproxy=true``),
as ``.ci/start`` does it (the launcher as a subprocess, its own session, the
environment without any Ray switch of ours: the launcher must close the cluster itself), waited for
until its "ready" line (at most 90 s); then every listening TCP socket of its process tree (from
``/proc/net/tcp{,6}`` and the tree's ``/proc/PID/fd``) must be on 127.0.0.0/8, ::1 or
::ffff:127.x, and after SIGTERM no process of the tree or of its session may be left (30 s).
Linux only (``/proc``).  The unit tests of `serve_app.ray_loopback` need no cluster.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from serve_app import ray_loopback
from serve_app.ray_loopback import LOCAL_ONLY
from loadtest.ports import free_port as _free_port

ROOT = Path(__file__).resolve().parents[2]
READY_S, STOP_S, GONE_S = 90.0, 60.0, 30.0

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------- ray_loopback units

@pytest.mark.parametrize("address,expected", [
    ("[::]:0", "127.0.0.1:0"), ("0.0.0.0:8000", "127.0.0.1:8000"), ("[::0]:9", "127.0.0.1:9"),
    ("127.0.0.1:0", "127.0.0.1:0"), ("10.0.0.5:7", "10.0.0.5:7"), ("[::1]:5", "[::1]:5")])
def test_wildcard_addresses_become_loopback_others_stay(address, expected):
    assert ray_loopback._loopback_address(address) == expected


def test_local_only_sets_rays_switch_in_the_given_environment():
    env: dict[str, str] = {LOCAL_ONLY: "1"}
    ray_loopback.local_only(env)
    assert env == {LOCAL_ONLY: "0"}
    assert ray_loopback.runtime_env({"A": "b"}) == {"env_vars": {"A": "b"},
                                                     "worker_process_setup_hook": ray_loopback.SETUP_HOOK}


def test_local_only_refuses_once_ray_read_its_switch(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "ray._private.ray_constants", types.SimpleNamespace(ENABLE_RAY_CLUSTER=True))
    monkeypatch.setenv(LOCAL_ONLY, "1")
    with pytest.raises(RuntimeError, match="before importing ray"):
        ray_loopback.local_only()


def test_the_setup_hook_changes_nothing_outside_a_local_only_cluster(monkeypatch):
    pytest.importorskip("ray")
    from ray._common import tls_utils

    real = tls_utils.add_port_to_grpc_server
    monkeypatch.setattr(ray_loopback, "is_local_only", lambda: False)
    ray_loopback.bind_wildcards_to_loopback()
    assert tls_utils.add_port_to_grpc_server is real


def test_the_setup_hook_binds_wildcards_on_loopback(monkeypatch):
    pytest.importorskip("ray")
    from ray._common import tls_utils

    seen: list[str] = []
    monkeypatch.setattr(tls_utils, "add_port_to_grpc_server", lambda server, address: seen.append(address) or 1)
    monkeypatch.setattr(ray_loopback, "is_local_only", lambda: True)
    ray_loopback.bind_wildcards_to_loopback()
    tls_utils.add_port_to_grpc_server(None, "[::]:0")
    tls_utils.add_port_to_grpc_server(None, "192.0.2.1:5")
    assert seen == ["127.0.0.1:0", "192.0.2.1:5"]


def test_haproxy_gets_private_files_and_its_wildcard_binds_become_loopback(monkeypatch, tmp_path):
    pytest.importorskip("ray")
    from ray.serve._private import haproxy

    env = ray_loopback.haproxy_env(str(tmp_path))
    assert env[ray_loopback.HAPROXY] == "1"
    assert all(v.startswith(str(tmp_path)) for k, v in env.items() if k != ray_loopback.HAPROXY)
    original = haproxy.HAPROXY_CONFIG_TEMPLATE
    assert "bind :{{ config.metrics_port }}" in original and "bind *:{{ config.stats_port }}" in original
    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", original)
    monkeypatch.setattr(ray_loopback, "is_local_only", lambda: True)
    monkeypatch.setenv(ray_loopback.HAPROXY, "1")
    ray_loopback.bind_wildcards_to_loopback()  # the setup hook, where the switch is on
    binds = [line.strip() for line in haproxy.HAPROXY_CONFIG_TEMPLATE.splitlines() if line.strip().startswith("bind ")]
    assert binds == ["bind 127.0.0.1:{{ config.metrics_port }}",  # the others: http.host (127.0.0.1 here)
                     "bind {{ config.frontend_host }}:{{ config.frontend_port }}",
                     "bind {{ config.grpc_frontend_host }}:{{ config.grpc_frontend_port }} proto h2",
                     "bind 127.0.0.1:{{ config.stats_port }}"]
    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", "global\n")  # a Ray whose template changed
    with pytest.raises(RuntimeError, match="cannot keep HAProxy on loopback"):
        ray_loopback.bind_haproxy_to_loopback()


# ------------------------------------------------------------------------------------ /proc helpers

def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session id, start time) of a live process, None if it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _tree(root: int) -> dict[int, int]:
    """{pid: start time} of ``root``, its descendants and every process in its session."""
    stats = {pid: s for pid in _all_pids() if (s := _stat(pid)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in out:
            out[pid] = stats[pid][2]
            todo += children.get(pid, [])
    out.update({pid: s[2] for pid, s in stats.items() if s[1] == root})  # the launcher leads its session
    return out


def _alive(procs: dict[int, int]) -> dict[int, int]:
    """The processes of ``procs`` (pid: start time) still alive (same pid, same start time)."""
    return {pid: t for pid, t in procs.items() if (s := _stat(pid)) is not None and s[2] == t}


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m:
            out.add(int(m.group(1)))
    return out


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp's address (host byte order in 32-bit words) -> the address."""
    raw = bytes.fromhex(hex_addr)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def _listening() -> dict[int, tuple[str, int]]:
    """{socket inode: (address, port)} of every listening TCP socket in this network namespace."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A":  # TCP_LISTEN
                addr, port = f[1].split(":")
                out[int(f[9])] = (str(_address(addr)), int(port, 16))
    return out


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _listeners(procs: dict[int, int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes hold."""
    table = _listening()
    return sorted({(pid, *table[i]) for pid in procs for i in _socket_inodes(pid) if i in table})


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:80]
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------ the launch

class Launch:
    """The launcher subprocess, its output (read by a thread) and the ports it was given."""

    def __init__(self, proc: subprocess.Popen, http_port: int, metrics_port: int, key: str) -> None:
        self.proc, self.http_port, self.metrics_port, self.key = proc, http_port, metrics_port, key
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.started: dict[int, int] = {}  # every process of its tree seen so far (pid: start time)

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if line.startswith("serve_app: ready on"):
                self.ready.set()

    def tree(self) -> dict[int, int]:
        procs = _tree(self.proc.pid)
        self.started.update(procs)
        return procs

    def log(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])


@pytest.fixture(scope="module", params=["python-proxy", "haproxy"])
def launched(request, tmp_path_factory):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc")
    pytest.importorskip("ray")
    http_port, metrics_port = _free_port(), _free_port()
    key = "closed-" + secrets.token_hex(12)
    ray_tmp = tempfile.mkdtemp(prefix="closed-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items()
           if k not in (LOCAL_ONLY, "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    env.update({"RAY_TMPDIR": ray_tmp, "TIERED_API_KEYS": f"{key}:premium",
                "TIERED_METRICS_EXPORT_PORT": str(metrics_port), "PYTHONUNBUFFERED": "1"})
    cmd = [sys.executable, "-m", "serve_app", "config=serve_app/configs/sim.yaml", "http.host=127.0.0.1",
           f"http.port={http_port}", "replicas.num_replicas=1", "engine.time_scale=0.05", "http.drain_timeout_s=2"]
    if request.param == "haproxy":  # its fixed ports (stats, Prometheus, fallback proxy) made free ones
        cmd.append("ingress.haproxy=true")
        env.update({"RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT":
                    str(_free_port()), "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port())})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    launch = Launch(proc, http_port, metrics_port, key)
    try:
        deadline = time.monotonic() + READY_S
        while not launch.ready.wait(0.5):
            launch.tree()
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the launcher did not get ready in {READY_S:.0f} s (exit code {proc.poll()}):\n"
                            f"{launch.log()}")
        launch.tree()
        yield launch
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        time.sleep(1)
        for pid in _alive(launch.started) | _alive(_tree(proc.pid)):  # whatever is left: by pid, our own
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.stdout.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_every_listening_socket_of_the_launch_is_on_loopback(launched):
    time.sleep(2)  # let the agents finish binding
    procs = launched.tree()
    listeners = _listeners(procs)
    open_ = [(pid, _comm(pid), addr, port) for pid, addr, port in listeners if not _is_loopback(addr)]
    assert not open_, "listening beyond loopback:\n" + "\n".join(map(str, open_))
    # and the scan saw what it must: HTTP (Serve's proxy), Prometheus (the metrics agent), the GCS
    gcs = re.search(r"ray status --address 127\.0\.0\.1:(\d+)", "\n".join(launched.lines))
    assert gcs, launched.log()
    ports = {port for _, _, port in listeners}
    assert {launched.http_port, launched.metrics_port, int(gcs.group(1))} <= ports, (listeners, launched.log())
    assert len({pid for pid, _, _ in listeners}) >= 5  # GCS, raylet, agents, controller, proxy, replicas


def test_no_process_of_the_launch_has_the_api_key_in_its_environment(launched):
    procs = launched.tree()
    key = launched.key.encode()
    read = 0
    for pid in procs:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        read += 1
        assert key not in environ, f"the API key is in the environment of {pid} {_comm(pid)}"
        assert key not in cmdline, f"the API key is in the command line of {pid} {_comm(pid)}"
        if b"RAY_AUTH_TOKEN_PATH=" in environ:  # a process of the cluster (not an unrelated one)
            assert b"TIERED_API_KEYS=" not in environ, f"{pid} {_comm(pid)} still has TIERED_API_KEYS"
    assert read >= 5 and launched.proc.pid in procs


def test_the_app_still_authenticates_with_the_key(launched):
    httpx = pytest.importorskip("httpx")
    base = f"http://127.0.0.1:{launched.http_port}"
    r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {launched.key}"}, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer closed-not-the-key-0123"}, timeout=30)
    assert r.status_code == 401


def test_sigterm_to_the_launcher_drains_the_streams_and_leaves_nothing_it_started(launched):
    import threading

    httpx = pytest.importorskip("httpx")
    procs = launched.tree()
    assert len(procs) >= 5, procs
    base = f"http://127.0.0.1:{launched.http_port}"
    model = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {launched.key}"},
                      timeout=30).json()["data"][0]["id"]
    streams: list[tuple[int, str]] = []

    def stream() -> None:  # ~10 s of tokens at time_scale 0.05: longer than the 2 s drain
        body = {"model": model, "prompt": "a long stream", "max_tokens": 6000, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {launched.key}"}) as r:
            streams.append((r.status_code, r.read().decode()))

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # streaming
    launched.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert len(streams) == 3, streams
    for status, text in streams:  # cut at the drain deadline, with an error event and [DONE]
        assert status == 200 and text.endswith("data: [DONE]\n\n") and "server_shutdown" in text, text[-300:]
    try:
        code = launched.proc.wait(STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launcher did not exit within {STOP_S:.0f} s of SIGTERM:\n{launched.log()}")
    assert code == 0, launched.log()
    assert "serve_app: drained: 0 of 3 requests finished, 3 ended" in launched.log(80), launched.log(80)
    deadline = time.monotonic() + GONE_S
    while (left := _alive(launched.started) | _alive(_tree(launched.proc.pid))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "left running after SIGTERM:\n" + "\n".join(f"{pid} {_comm(pid)}" for pid in left)
