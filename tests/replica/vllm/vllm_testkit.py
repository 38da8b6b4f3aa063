"""Helpers for in-process vLLM engine tests (importable: conftest.py puts this folder on sys.path).

- `engine_scheduler(llm)`: the scheduler instance an in-process `vllm.LLM` runs.
- `LLMFactory`: builds `vllm.LLM` engines on the tiny model, keeping ONE engine alive at a time.
  vLLM keeps its (world size 1) distributed state in module globals: two engines can live side by
  side, but shutting one down tears the state down under the other ("pipeline model parallel group
  is not initialized"). So asking for a different configuration shuts the previous engine down first
  (about 1.5 s to start the next one once vLLM is warm); asking for the same one returns it again.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

from replica.tiny_model import TINY_ENGINE_ARGS

log = logging.getLogger(__name__)

MiB = 1 << 20

# The tiny model's engine (replica.tiny_model.TINY_ENGINE_ARGS, also what loadtest.sim_to_real runs).
ENGINE_DEFAULTS: dict[str, Any] = TINY_ENGINE_ARGS


def engine_scheduler(llm):
    """The scheduler instance of an in-process engine.

    `LLM.llm_engine` (v1 `LLMEngine`) -> `.engine_core` (`InprocClient`, with
    VLLM_ENABLE_V1_MULTIPROCESSING=0) -> `.engine_core` (`EngineCore`) -> `.scheduler`.
    With multiprocessing the client is a `SyncMPClient` and the scheduler lives in another process.
    """
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)
    if core is None:
        raise RuntimeError(
            f"engine core client is {type(client).__name__}: the scheduler is in another process; "
            "set VLLM_ENABLE_V1_MULTIPROCESSING=0 before creating the engine"
        )
    return core.scheduler


def shutdown_llm(llm) -> None:
    """Shut an in-process engine down (scheduler, executor, distributed state) and free it."""
    client = llm.llm_engine.engine_core
    client.shutdown()
    gc.collect()


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB
    except OSError:  # not Linux
        return float("nan")


class LLMFactory:
    """`factory(scheduler_cls=None, **kw) -> vllm.LLM` on `model_dir`, one live engine at a time.

    `kw` overrides ENGINE_DEFAULTS (any `vllm.LLM` argument). The same (scheduler_cls, kw) returns
    the live engine again (shared across tests: leave it idle, no requests in flight); a different
    one shuts the live engine down first, so an `LLM` from an earlier call may be dead.
    `starts` records (key, seconds, RSS MiB after start) per engine started.
    """

    def __init__(self, model_dir) -> None:
        self.model_dir = str(model_dir)
        self._key: tuple | None = None
        self._llm = None
        self.starts: list[tuple[tuple, float, float]] = []

    def __call__(self, scheduler_cls: str | type | None = None, **kw: Any):
        args = {**ENGINE_DEFAULTS, **kw, "scheduler_cls": scheduler_cls}
        key = tuple(sorted((k, repr(v)) for k, v in args.items()))
        if self._llm is not None and key == self._key:
            return self._llm
        self.close()

        from vllm import LLM

        t0 = time.perf_counter()
        llm = LLM(model=self.model_dir, tokenizer=self.model_dir, **args)
        took = time.perf_counter() - t0
        self.starts.append((key, took, _rss_mib()))
        log.info("vLLM engine (scheduler_cls=%s) started in %.2f s", scheduler_cls, took)
        self._key, self._llm = key, llm
        return llm

    def close(self) -> None:
        llm, self._llm, self._key = self._llm, None, None
        if llm is not None:
            shutdown_llm(llm)
            del llm
            gc.collect()


def assert_executed_as_planned(log, budget: int | None = None) -> None:
    """Every step: vLLM scheduled exactly the plan's requests with the plan's token counts, and
    preempted exactly the plan's victims (no more, none of its own)."""
    assert log, "no step recorded"
    for k, rec in enumerate(log):
        planned = {rid: 1 for rid in rec.planned["decodes"]}
        planned.update(dict(rec.planned["prefills"]))
        assert rec.executed == planned, f"step {k}: vLLM ran {rec.executed}, the policy planned {planned}"
        assert rec.preempted == sorted(rec.planned["preempted"]), (
            f"step {k}: vLLM preempted {rec.preempted}, the policy planned {rec.planned['preempted']}")
        if budget is not None:
            assert sum(planned.values()) <= budget
