"""One poller for every request waiting in line, so a thousand open WebSockets cost one Redis
round trip per tick instead of a thousand.

Each tick reads, in one pipeline, the state, host and rank of every watched task and pushes a
``Status`` to each subscriber when it changed. ETAs come from
``Allocator.estimated_start_time(task_id)`` when the allocator has it (null until then), at most
once per ``eta_interval_s`` per task; the first ETA reported for a task is recorded in
``Keys.eta_predictions`` so /metrics can count how far off it was when the task starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis

from ..client import Allocator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Status:
    state: str | None  # None: the task no longer exists
    host: str | None
    position: int | None
    eta: datetime | None


def _as_datetime(v: Any) -> datetime | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=timezone.utc)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return datetime.fromtimestamp(float(v), tz=timezone.utc)
    if isinstance(v, str):
        try:
            return _as_datetime(datetime.fromisoformat(v.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def estimated_start(a: Allocator, task_id: str, *, record: bool = True) -> datetime | None:
    """The allocator's ETA for a pending task, or None (also while the allocator has no
    ``estimated_start_time``). The first one reported is kept for the ETA-error metric."""
    fn = getattr(a, "estimated_start_time", None)
    if not callable(fn):
        return None
    try:
        eta = _as_datetime(fn(task_id))
    except Exception as exc:  # an estimate is advisory: never fail a request for it
        log.debug("estimated_start_time(%s) failed: %s", task_id, exc)
        return None
    if eta is not None and record:
        try:
            a.redis.hsetnx(a.keys.eta_predictions, task_id, int(eta.timestamp() * 1000))
        except redis.RedisError:
            pass
    return eta


def read_status(a: Allocator, ids: list[str]) -> dict[str, tuple[str | None, str | None, int | None]]:
    pipe = a.redis.pipeline(transaction=False)
    for i in ids:
        pipe.hmget(a.keys.alloc(i), "state", "host")
        pipe.zrank(a.keys.pending, i)
    replies = pipe.execute()
    out = {}
    for n, i in enumerate(ids):
        state, host = replies[2 * n]
        rank = replies[2 * n + 1]
        position = int(rank) + 1 if rank is not None else (0 if state is not None else None)
        out[i] = (state, host or None, position)
    return out


class Waiters:
    """Subscriptions to task status, served by one background poll loop (``run``)."""

    def __init__(self, allocator: Allocator, interval_s: float = 0.1, eta_interval_s: float = 1.0) -> None:
        self.a = allocator
        self.interval_s = interval_s
        self.eta_interval_s = eta_interval_s
        self._subs: dict[str, set[asyncio.Queue[Status]]] = {}
        self._last: dict[str, Status] = {}
        self._eta: dict[str, tuple[float, datetime | None, int | None]] = {}
        self._wake = asyncio.Event()

    def subscribe(self, task_id: str) -> asyncio.Queue[Status]:
        q: asyncio.Queue[Status] = asyncio.Queue()
        self._subs.setdefault(task_id, set()).add(q)
        self._last.pop(task_id, None)  # the new subscriber gets the current status on the next tick
        self._wake.set()
        return q

    def unsubscribe(self, task_id: str, q: asyncio.Queue[Status]) -> None:
        subs = self._subs.get(task_id)
        if subs is not None:
            subs.discard(q)
            if not subs:
                del self._subs[task_id]
                self._last.pop(task_id, None)
                self._eta.pop(task_id, None)

    def _poll(self, ids: list[str]) -> dict[str, Status]:
        raw = read_status(self.a, ids)
        now = time.monotonic()
        out = {}
        for i, (state, host, position) in raw.items():
            eta = None
            if state == "pending":
                at, prev, prev_pos = self._eta.get(i, (0.0, None, None))
                if now - at >= self.eta_interval_s or prev_pos != position:
                    prev = estimated_start(self.a, i)
                    self._eta[i] = (now, prev, position)
                eta = prev
            out[i] = Status(state, host, position, eta)
        return out

    async def run(self) -> None:
        """The poll loop; runs until cancelled (the app's lifespan owns it)."""
        while True:
            ids = list(self._subs)
            if ids:
                try:
                    statuses = await asyncio.to_thread(self._poll, ids)
                except redis.RedisError as exc:
                    log.warning("waiter poll failed: %s", exc)
                    statuses = {}
                for i, st in statuses.items():
                    if self._last.get(i) != st:
                        self._last[i] = st
                        for q in list(self._subs.get(i, ())):
                            q.put_nowait(st)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            except asyncio.TimeoutError:
                pass
