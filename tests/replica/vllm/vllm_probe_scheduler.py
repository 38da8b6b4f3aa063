"""A test-local vLLM scheduler, loaded by the engine from its dotted path.

`scheduler_cls="vllm_probe_scheduler.ProbeScheduler"`: this folder's conftest.py puts the folder on
`sys.path`, and the tests run the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so vLLM's
`resolve_obj_by_qualname` imports this very module (one module object, the tests see the same class).
The module name is unique on purpose: `tests/` is no package, and a generic name could collide with
another test folder's helper on `sys.path`.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler


class ProbeScheduler(Scheduler):
    """The default scheduler plus a record of what it saw, per step.

    `extra_args[req_id]`: `request.sampling_params.extra_args` of every request it scheduled;
    `steps`: one `{req_id: num_scheduled_tokens}` per `schedule()` call that scheduled something;
    `updates`: number of `update_from_output()` calls.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extra_args: dict[str, dict | None] = {}
        self.steps: list[dict[str, int]] = []
        self.updates = 0

    def schedule(self, *args, **kwargs):
        out = super().schedule(*args, **kwargs)
        if out.num_scheduled_tokens:
            self.steps.append(dict(out.num_scheduled_tokens))
        for req_id in out.num_scheduled_tokens:
            req = self.requests[req_id]
            params = req.sampling_params
            self.extra_args[req_id] = None if params is None else params.extra_args
        return out

    def update_from_output(self, *args, **kwargs):
        self.updates += 1
        return super().update_from_output(*args, **kwargs)

    def reset_probe(self) -> None:
        self.extra_args.clear()
        self.steps.clear()
        self.updates = 0
