"""The compiled modules (replica.native): used only when built from the current sources, and they
give the same runs as the sources, to the last bit."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import replica.native as native

ROOT = Path(__file__).resolve().parents[2]

# One run per scheduler family, overloaded (long queues, preemptions), and the prefix-cache engine.
RUNS = [
    {"scheduler": s, "qps": 3.0} for s in ("sarathi-fcfs", "vllm", "rad", "slai-spf-dynamic", "slai-spf-tier-dynamic",
                                           "slai-plus", "slai-next")
] + [{"scheduler": "slai-next", "qps": 4.0, "trace": "mooncake", "profile": "h100-mistral7b-measured", "kv_blocks": 6000}]

_RUN_SCRIPT = """
import json, sys
import replica.native
from loadtest.simulate.sweep import SweepSetup, run_point
out = []
for spec in json.loads(sys.argv[1]):
    spec = dict(spec)
    sched, qps = spec.pop("scheduler"), spec.pop("qps")
    res = run_point(SweepSetup(requests=600, **spec), sched, qps)
    out.append({k: v for k, v in res.items() if "wall" not in k})
print(json.dumps({"native": replica.native.in_use(), "runs": out}, sort_keys=True))
"""


def _runs(native_env: str) -> dict:
    env = {**os.environ, native.ENV: native_env, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _RUN_SCRIPT, json.dumps(RUNS)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _can_build() -> bool:
    return importlib.util.find_spec("mypyc") is not None and shutil.which(os.environ.get("CC", "cc")) is not None


def test_the_build_is_current_where_it_can_be_built():
    """The README's test command builds it (`.ci/setup`); a source edited since then must be
    rebuilt, or this says so (the edited source itself is what runs meanwhile)."""
    if not _can_build():
        pytest.skip("no mypyc or C compiler here: everything runs from source")
    ok, why = native.status()
    if os.environ.get(native.ENV) == "0":
        pytest.skip(f"{native.ENV}=0")
    assert ok, f"{why} (bash .ci/setup, or python -m replica.native build)"


def test_a_current_build_is_what_this_process_imports():
    ok, why = native.status()
    if not ok:
        pytest.skip(why)
    import loadtest.simulate.replica
    import replica.policy.slai
    import replica.sim.engine

    assert native.in_use()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for mod in (replica.policy.slai, replica.sim.engine, loadtest.simulate.replica):
        assert mod.__file__.endswith(suffix) and str(native.NATIVE_DIR) in mod.__file__


def test_compiled_and_source_modules_give_identical_runs():
    if not native.status()[0]:
        pytest.skip(native.status()[1])
    compiled, source = _runs("1"), _runs("0")
    assert compiled["native"] and not source["native"]
    assert compiled["runs"] == source["runs"]
    assert any(r["preemptions"] for r in source["runs"])  # the overloaded runs preempt


def test_a_stale_build_is_reported_and_not_used(monkeypatch):
    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setattr(native, "sources_digest", lambda: "edited since the build")
    if not native.MANIFEST.exists():
        pytest.skip("not built")
    ok, why = native.status()
    assert not ok and why.startswith("stale")
    monkeypatch.setattr(native, "_installed", None)
    with pytest.warns(RuntimeWarning, match="stale"):
        assert native.install() is False
    assert native._installed is None


def test_no_build_means_the_sources_silently(monkeypatch, tmp_path):
    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setattr(native, "MANIFEST", tmp_path / "manifest.json")
    monkeypatch.setattr(native, "_installed", None)
    ok, why = native.status()
    assert not ok and why.startswith("not built")
    assert native.install() is False


def test_replica_native_0_turns_it_off(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native.status() == (False, f"{native.ENV}=0")


def test_a_build_for_another_python_is_not_used(monkeypatch, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"abi": "cpython-39.cpython-39-x86_64-linux-gnu.so",
                                    "sources": native.sources_digest(), "files": {}}))
    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setattr(native, "MANIFEST", manifest)
    ok, why = native.status()
    assert not ok and "rebuild" in why


def test_it_is_all_or_none_once_a_module_ran_from_source(monkeypatch):
    if not native.status()[0]:
        pytest.skip(native.status()[1])
    monkeypatch.setattr(native, "_installed", None)
    monkeypatch.setitem(sys.modules, native.MODULES[0], sys.modules.get(native.MODULES[0]) or object())
    with pytest.warns(RuntimeWarning, match="after some of its modules"):
        assert native.install() is False
