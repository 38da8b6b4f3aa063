"""`python -m loadtest.vllm_bench overhead` on the real (CPU) engine: two engines in one process,
both schedulers timed on every step (its own process: the command shuts its engines down, which
would tear vLLM's distributed state down under this process's engines)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (the `cpu` or `gpu` extra)", allow_module_level=True)


def test_the_overhead_command_times_both_schedulers_on_the_same_steps():
    proc = subprocess.run([sys.executable, "-m", "loadtest.vllm_bench", "overhead", "--running", "4", "--steps", "6",
                           "--repeats", "2", "--log-stats"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    for name in ("vllm-default", "slai"):
        assert res[name]["4"]["steps_timed"] == [6, 6]
        assert res[name]["4"]["median_ms"] > 0
    assert len(res["ratios"]["4"]) == 2 and res["ratio"]["4"] > 0
    assert res["log_stats"] is True  # vLLM's statistics on, as its API server runs
