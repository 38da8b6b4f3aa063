"""The serving stacks the planner compares: a request router and a replica scheduler each."""

from __future__ import annotations

from dataclasses import dataclass

from replica.policy.registry import available_schedulers

__all__ = ["STACKS", "STACK_BY_KEY", "Stack", "available_stacks"]


@dataclass(frozen=True)
class Stack:
    key: str
    label: str
    router: str
    scheduler: str
    note: str

    @property
    def pair(self) -> str:
        return f"{self.router}+{self.scheduler}"


STACKS: tuple[Stack, ...] = (
    Stack("default", "Ray Serve default + vLLM default", "pow2", "sarathi-fcfs",
          "Ray Serve's default request router is power-of-two-choices on queue length (router `pow2`); "
          "vLLM V1's default scheduler is chunked prefill with FCFS admission, running requests first "
          "(scheduler preset `sarathi-fcfs`; the preset `vllm` is vLLM v0's no-chunking scheduler, not "
          "the V1 default)"),
    Stack("slai", "our router + SLAI", "slo", "slai-spf-dynamic",
          "the SLO-aware router `slo` with its in-flight ledger + SLAI (shortest prompt first, dynamic "
          "Theta; preset `slai-spf-dynamic`)"),
    Stack("slai-plus", "our router + beyond-the-paper scheduler", "slo", "slai-plus",
          "the router `slo` + the scheduler preset `slai-plus` (only when the registry has it)"),
)
STACK_BY_KEY = {s.key: s for s in STACKS}


def available_stacks() -> list[Stack]:
    """The stacks whose scheduler is in the registry (``slai-plus`` may be absent)."""
    schedulers = set(available_schedulers())
    return [s for s in STACKS if s.scheduler in schedulers]
