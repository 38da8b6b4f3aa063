"""Test-local subclasses of the adapter's schedulers that check its KV mirror against vLLM.

`scheduler_cls="vllm_kv_probe.KVCheckSLAIScheduler"` (or `KVCheckPolicyScheduler`, `KVCheckSLAIAsyncScheduler`): loaded by the
engine from this folder (conftest.py puts it on `sys.path`; the engine runs in-process), so the
tests see the very class and instance.  Separate from `vllm_probe_scheduler` so that the default
scheduler's probe does not import the adapter.
"""

from __future__ import annotations


def _kv_check_scheduler(base: type) -> type:
    """`base` (a `replica.vllm_scheduler` policy scheduler) plus, at every `mirror_state`, the KV use
    the mirror gave the policy beside what vLLM's own structures say, and the running mirrors the
    policy saw beside vLLM's running requests (order and progress) (`kv_checks`); at every
    `schedule`, for each admission, the computed tokens the plan started it from (its prefix hit as
    the policy saw it) beside where vLLM started it (`admission_starts`: (id, planned, vLLM's,
    the mirror's num_cached_tokens after it)); and a count of the cached blocks vLLM's pool evicted
    (`evictions`)."""

    class KVCheck(base):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.kv_checks: list[dict] = []
            self.admission_starts: list[tuple[str, int, int, int]] = []
            self.evictions = 0
            pool = self.kv_cache_manager.block_pool
            evict = pool._maybe_evict_cached_block

            def counting_evict(block):
                evicted = evict(block)
                self.evictions += bool(evicted)
                return evicted

            pool._maybe_evict_cached_block = counting_evict  # get_new_blocks calls it per block it takes

        def schedule(self, *args, **kwargs):
            out = super().schedule(*args, **kwargs)
            view = self.prefix_view
            for rid in self.step_log[-1].planned["admitted"]:
                planned = view.hit(rid)[0] if view is not None else 0  # this step's lookup, as the policy saw it
                started = self.requests[rid].num_computed_tokens - out.num_scheduled_tokens.get(rid, 0)
                self.admission_starts.append((rid, planned, started, self.mirrors[rid].num_cached_tokens))
            return out

        def mirror_state(self, now_s):
            state = super().mirror_state(now_s)
            pool = self.kv_cache_manager.block_pool
            manager = self.kv_cache_manager.coordinator.single_type_managers[0]
            bs = self.block_size
            tables = {v.request_id: manager.req_to_blocks.get(v.request_id, []) for v in self.running}
            reserved = 0
            for v in self.running:  # a started prefill holds its whole prompt (Sarathi-style reservation)
                num_output = v.num_output_tokens + v.num_output_placeholders  # async: in flight counts
                num_tokens = v.num_prompt_tokens + num_output
                if num_output == 0 or num_tokens - v.num_computed_tokens > 1:
                    reserved += max(0, -(-num_tokens // bs) - len(tables[v.request_id]))
            self.kv_checks.append({
                "mirror": state.kv.num_used_blocks,
                "pool": pool.num_gpu_blocks - 1 - pool.get_num_free_blocks(),
                "distinct": len({b.block_id for t in tables.values() for b in t if not b.is_null}),
                "per_request": sum(len(t) for t in tables.values()),
                "reserved": reserved,
                "num_blocks": state.kv.num_blocks,
                "running_num_blocks": {m.req_id: m.num_blocks for m in state.running},
                "tables": {rid: len(t) for rid, t in tables.items()},
                # the running mirrors the policy saw (reused from the last `update_from_output`, or
                # synced now) are vLLM's running requests, in its order, with vLLM's progress
                "running_order": ([m.req_id for m in state.running], [v.request_id for v in self.running]),
                "progress": [((m.num_computed_tokens, m.num_output_tokens),
                              (v.num_computed_tokens, v.num_output_tokens + v.num_output_placeholders))
                             for m, v in zip(state.running, self.running)],
            })
            return state

    KVCheck.__name__ = KVCheck.__qualname__ = f"KVCheck{base.__name__}"
    return KVCheck


def _adapter(name: str) -> type:
    from replica import vllm_scheduler

    return getattr(vllm_scheduler, name)


KVCheckSLAIScheduler = _kv_check_scheduler(_adapter("SLAIScheduler"))
KVCheckPolicyScheduler = _kv_check_scheduler(_adapter("PolicyScheduler"))
KVCheckSLAIAsyncScheduler = _kv_check_scheduler(_adapter("SLAIAsyncScheduler"))
