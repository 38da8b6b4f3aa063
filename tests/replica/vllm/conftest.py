"""Fixtures for in-process vLLM engine tests on a tiny random Llama built offline.

- Sets VLLM_ENABLE_V1_MULTIPROCESSING=0 at import (before vLLM is imported anywhere in the session):
  the engine core runs in the test process, so its scheduler is reachable (vllm_testkit.
  engine_scheduler) and scheduler classes given by dotted path import from this process's sys.path.
- Puts this folder on sys.path: `vllm_testkit` and `vllm_probe_scheduler` import by
  plain name whatever pytest's import mode (there is no tests/__init__.py), and
  `scheduler_cls="vllm_probe_scheduler.ProbeScheduler"` resolves.
- The test modules skip themselves when vLLM is not installed (no `cpu`/`gpu` extra); this file does
  not import vLLM, so collection stays cheap.

Fixtures (session scope):
- `tiny_model_dir -> Path`: the model folder (built once, ~1 s after imports).
- `make_llm(scheduler_cls: str | type | None = None, **kw) -> vllm.LLM`: a vllm_testkit.LLMFactory;
  one live engine at a time, shared by every test asking for the same arguments, all shut down at
  the end of the session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from replica.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def make_llm(tiny_model_dir):
    from vllm_testkit import LLMFactory

    saved_env = dict(os.environ)
    factory = LLMFactory(tiny_model_dir)
    try:
        yield factory
    finally:
        factory.close()
        # vLLM sets process-wide variables at engine start (VLLM_WORKER_MULTIPROC_METHOD=spawn,
        # TORCHINDUCTOR_COMPILE_THREADS=1, ...): do not leak them into later tests.
        for k in set(os.environ) - set(saved_env):
            del os.environ[k]
        os.environ.update(saved_env)
