"""The replicas' feedback as one ingress sees it: every replica's latest snapshot, polled while
requests arrive, for admission control (`serve_app.admission`).

`FeedbackPoller` calls ``record_routing_stats`` on every running replica each ``period_s`` with
``DeploymentHandle.broadcast`` (Ray Serve's fan-out to all running replicas; a normal handle call
would reach one replica through the router, and the routers' own copies of the snapshots are
refreshed by the controller only every ``router.feedback_period_s``).  It polls while requests
arrive or are in flight and stops after ``idle_s`` without one (the next request starts it
again).  Snapshots older than ``forget_after_s`` are dropped (their replica is gone).

It also says whether any replica can serve (`healthy_replicas`): how many running replicas
answered the last poll, if that poll is recent (unknown, not 0, when none answered but one was
only slow: an overloaded replica is not a dead one); `check_available` polls at once when it is
not, so an ingress whose replicas are all gone answers 503 at once instead of queueing requests that
no replica will take.

And, given a handle to the ingress deployment itself (``peers``), it counts the running ingress
replicas every ``peers_period_s`` while it polls (`count_peers`: a broadcast of their ``state``),
and hands the count to ``on_peers``: the ingress's share of the admission bounds follows it
(`serve_app.admission.ingress_share`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from router.feedback import FeedbackError, ReplicaFeedback
from serve_app.admission import TBTHistory

__all__ = ["FeedbackPoller", "broadcast_each"]

logger = logging.getLogger("ray.serve")


async def broadcast_each(handle: Any, method: str, timeout_s: float) -> list[Any]:
    """``method`` called on every running replica of ``handle``'s deployment: each replica's
    result, or the exception it raised, or a ``TimeoutError`` if it did not answer within
    ``timeout_s`` (no result at all when Serve has no running replica; a ``TimeoutError`` raised
    when Serve did not say which replicas run within ``timeout_s``: not known, not none).  Ray's
    ``DeploymentBroadcastResponse.results_async(timeout_s=...)`` is all or nothing: one replica
    that hangs (alive, not answering) makes it raise and hides every other replica's answer, which would blind admission exactly when a replica misbehaves; so each
    replica gets its own deadline here (through the response's per-replica results: Ray is pinned
    to 2.60, and the live hung-replica test runs this path)."""
    from ray.serve.exceptions import DeploymentUnavailableError

    response = handle.broadcast(method)
    try:
        replica_results = await asyncio.wait_for(response._fetch_replica_results_async(), timeout_s)
    except DeploymentUnavailableError:  # Serve has no running replica to call: none can serve
        return []
    return list(await asyncio.gather(*(asyncio.wait_for(rr.get_async(), timeout_s) for rr in replica_results),
                                     return_exceptions=True))


class FeedbackPoller:
    def __init__(self, replicas: Any, *, period_s: float, timeout_s: float, idle_s: float, forget_after_s: float,
                 tbt_window_s: float, num_replicas: int, busy: Callable[[], bool] = lambda: False,
                 peers: Callable[[], Any] | None = None, peers_period_s: float = 5.0,
                 on_peers: Callable[[int], None] | None = None) -> None:
        """``replicas``: the replica deployment's handle; ``busy()``: whether requests are in
        flight (polling goes on while they are); ``num_replicas``: the configured count, until a
        poll finds how many run; ``peers()``: a handle to the ingress deployment (made on first
        use), whose running replicas are counted every ``peers_period_s`` and handed to
        ``on_peers``."""
        self.replicas = replicas
        self.peers, self.peers_period_s, self.on_peers = peers, peers_period_s, on_peers
        self._peers_handle: Any = None
        self.peers_counted_s = -float("inf")  # time.monotonic() of the last count
        self.period_s, self.timeout_s, self.idle_s, self.forget_after_s = period_s, timeout_s, idle_s, forget_after_s
        self.busy = busy
        self.feedback: dict[str, ReplicaFeedback] = {}  # replica id -> its latest snapshot
        self.tbt_history = TBTHistory(tbt_window_s)
        self.num_replicas = num_replicas  # as the last poll found them
        self._task: asyncio.Task | None = None
        self._failures = 0
        self._last_request_s = time.monotonic()
        self.healthy: int | None = None  # replicas that answered the last poll (None: not known)
        self.polled_s = -float("inf")  # time.monotonic() of the last poll that completed
        self._poll_lock = asyncio.Lock()

    def on_request(self) -> None:
        """A request arrived: keep (or start) polling."""
        self._last_request_s = time.monotonic()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while time.monotonic() - self._last_request_s <= self.idle_s or self.busy():
            try:
                await self.poll_once(self.timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - admission goes on with older snapshots
                self._failures += 1
                if self._failures in (1, 10, 100) or self._failures % 1000 == 0:
                    logger.warning("ingress: polling the replicas' feedback failed (%d times): %r", self._failures, e)
            if self.peers is not None and time.monotonic() - self.peers_counted_s >= self.peers_period_s:
                try:
                    await self.count_peers(self.timeout_s)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - the shares stay those of the last count
                    logger.warning("ingress: counting the ingress replicas failed: %r", e)
            await asyncio.sleep(self.period_s)

    async def count_peers(self, timeout_s: float = 5.0) -> int | None:
        """How many ingress replicas run now (this one included): Serve's running replicas of the
        ingress deployment, each asked for its ``state``; one that does not answer in time counts
        (it still holds its requests), one that died does not.  Hands the count to ``on_peers``;
        None (and nothing handed) when Serve lists none."""
        from ray.exceptions import RayActorError

        if self.peers is None:
            return None
        if self._peers_handle is None:
            self._peers_handle = self.peers()
        try:
            results = await broadcast_each(self._peers_handle, "state", timeout_s)
        finally:
            self.peers_counted_s = time.monotonic()
        count = sum(1 for r in results if not isinstance(r, RayActorError))
        if count == 0:
            return None
        if self.on_peers is not None:
            self.on_peers(count)
        return count

    async def healthy_replicas(self, max_age_s: float, timeout_s: float = 1.0) -> int | None:
        """Replicas that answered a poll no older than ``max_age_s`` (polling now, once for all
        concurrent callers, if the last one is older); None when it cannot be known (the poll
        itself failed)."""
        if time.monotonic() - self.polled_s > max_age_s:
            async with self._poll_lock:
                if time.monotonic() - self.polled_s > max_age_s:
                    try:
                        await self.poll_once(timeout_s)
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # noqa: BLE001 - unknown, not unavailable
                        logger.debug("ingress: health poll failed: %r", e)
        return self.healthy

    async def poll_once(self, timeout_s: float = 5.0) -> list[ReplicaFeedback]:
        """One poll of every running replica; updates the snapshots, the TBT history and the
        count of healthy replicas."""
        try:
            results = await broadcast_each(self.replicas, "record_routing_stats", timeout_s)
        except Exception:
            self.healthy = None  # unknown, not unavailable
            raise
        finally:  # a failed poll counts as one: requests do not poll again before max_age_s
            self.polled_s = time.monotonic()
        fresh = []
        for r in results:
            if isinstance(r, BaseException) or not r:
                continue
            try:
                fresh.append(ReplicaFeedback.from_snapshot(r))
            except (FeedbackError, ValueError):
                continue
        if results:
            self.num_replicas = len(results)
        # a replica that did not answer in time is busy or hung, not down: overload must not
        # read as "no replica" (every request would get 503); a hung one is caught by the
        # requests' own deadlines (serve_app.stream).  So with none fresh and one slow: unknown.
        slow = any(isinstance(r, TimeoutError) for r in results)
        self.healthy = len(fresh) if fresh or not slow else None
        for fb in fresh:
            self.feedback[fb.replica_id] = fb
        self.tbt_history.add(fresh)
        now = time.time()
        stale = [rid for rid, fb in self.feedback.items() if now - fb.timestamp_s > self.forget_after_s]
        for rid in stale:
            del self.feedback[rid]
        if stale:
            self.tbt_history.forget(self.feedback)
        return fresh
