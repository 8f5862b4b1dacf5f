"""WebSocket ``/ws/allocate``: seed 003's long-wait placement with a pluggable policy.

The client sends one message (``adhoc``, ``policy_rule_uri``, ``clusters``, ``filter``,
``inputs``, ``parameters``, ``settings``); the server answers with JSON frames:

* ``{"type": "accepted", "allocation_id", "policy"}`` once the message is valid;
* ``{"type": "queued", "allocation_id", "position", "estimated_start_time", "node_id"}`` when
  the request has to wait, then ``{"type": "position", ...}`` whenever the place in line or the
  ETA changes (and every ``progress_interval_s`` as a keep-alive);
* ``{"type": "placed", "placement": {cluster_id, node_id, gpus}, "allocation": {...}}`` and a
  normal close (1000); the lease is then the client's to release (REST DELETE or its TTL);
* or ``{"type": "error", "error": {code, message, field}}`` and a close with 4000 + the HTTP
  status the same error would have (4400, 4401, 4409, 4422, ...).

Closing the socket (or sending ``{"type": "cancel"}``) before the placement is delivered cancels
the request: it leaves the line, or is released if it was granted in the meantime.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import redis
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import TypeAdapter, ValidationError

from ..client import new_allocation_id
from ..errors import REDIS_UNAVAILABLE, AllocationEnded, AllocatorError, InvalidRequest, Refused
from ..models import Allocation
from .errors import (BackendUnavailable, MalformedBody, NoCandidates, Unauthorized, WaitTimeout, error_body,
                     from_validation_errors, status_of)
from .metrics import count_refusal
from .placing import (
    ClusterClient,
    ClusterMetricsClient,
    PolicyRun,
    candidate_selector,
    placement_of,
    matching_hosts,
    timed_eval,
)
from .policies import BestFit, FirstFit, PriorityPreempt, WorstFit
from .schemas import AllocateMessage, ExecutionSettings
from .state import ApiState

log = logging.getLogger(__name__)
router = APIRouter()
FIRST_MESSAGE_TIMEOUT_S = 30.0
CANCEL_RETRY_PAUSE_S = 0.25
# Built-ins whose eval ignores the candidates (exact types: a subclass may read them).
LEDGER_STRATEGIES = (BestFit, FirstFit, WorstFit, PriorityPreempt)


class RequestEnded(Refused):
    """The request left the line without being placed (cancelled or released elsewhere)."""

    code = "CANCELLED"
    default_message = "the request was cancelled before it was placed"


def _prefixed(exc: InvalidRequest, prefix: str) -> InvalidRequest:
    return type(exc)(f"{prefix}{exc.field}", exc.reason)


@router.websocket("/ws/allocate")
async def ws_allocate(websocket: WebSocket) -> None:
    st: ApiState = websocket.app.state.api
    try:
        st.check_token(websocket.headers.get("authorization"))
    except Unauthorized:
        await websocket.close(code=4401)  # before accept: the handshake is refused (HTTP 403)
        return
    if not st.config.token and _cross_origin(websocket.headers.get("origin"), websocket.headers.get("host"),
                                             websocket.headers.get("x-forwarded-host")):
        # Browsers let any page open a WebSocket to any address: without a token, a page the
        # operator visits could allocate on a server it can reach. (With a token it cannot: a
        # browser's WebSocket sends no Authorization header.) Clients that are no browser send no Origin.
        await websocket.close(code=4403)
        return
    await websocket.accept()
    await Session(st, websocket).serve()


def _cross_origin(origin: str | None, host: str | None, forwarded_host: str | None = None) -> bool:
    """Whether a handshake's Origin names another host (and port) than the one it was sent to
    (or, behind a reverse proxy that rewrites Host, the one it names in X-Forwarded-Host)."""
    if origin is None:
        return False
    return urlsplit(origin).netloc.lower() not in {(host or "").lower(), (forwarded_host or "").lower()} - {""}


def _not_cancelled(allocation_id: str | None, what: str) -> BackendUnavailable:
    """The answer when a cancel could not reach Redis: the request stands until its TTL ends it
    or a later cancel (REST DELETE) gets through."""
    return BackendUnavailable(f"the ledger's Redis is unavailable: the request was not {what}; its TTL ends it, "
                              f"or cancel it again (DELETE /v1/allocations/{allocation_id})")


_TIME = TypeAdapter(datetime)


def _json_time(t: datetime | None) -> str | None:
    """A time as the REST routes write it (pydantic's JSON form: UTC with a trailing Z)."""
    return None if t is None else _TIME.dump_python(t, mode="json")


class Session:
    """One request over one socket, from the message to the placement (or its cancellation)."""

    def __init__(self, st: ApiState, ws: WebSocket) -> None:
        self.st, self.ws, self.a = st, ws, st.allocator
        self.stop = asyncio.Event()  # the client left or asked to cancel
        self.asked_cancel = False  # it sent {"type": "cancel"} (and may still read the answer)
        self.allocation_id: str | None = None
        # Whether this session made the allocation: one the client named by an id that already
        # existed (placing is idempotent by id) belongs to whoever made it, and is never cancelled here.
        self.owned = True
        self.claimed: str | None = None  # the client-named id this session claimed, if any
        self.uri = ""
        self.settings = ExecutionSettings()
        self.t0 = time.perf_counter()

    async def serve(self) -> None:
        try:
            first = await asyncio.wait_for(self.ws.receive(), timeout=FIRST_MESSAGE_TIMEOUT_S)
        except (WebSocketDisconnect, RuntimeError):
            return
        except asyncio.TimeoutError:
            await self.fail(InvalidRequest("message", f"no request within {FIRST_MESSAGE_TIMEOUT_S:g} s"))
            return
        if first["type"] == "websocket.disconnect":
            return
        text = first.get("text")
        if text is None:
            text = (first.get("bytes") or b"").decode("utf-8", errors="replace")
        self.t0 = time.perf_counter()
        try:
            await self._run(text)
        finally:
            await asyncio.to_thread(self._drop_claim)

    async def _run(self, text: str) -> None:
        try:
            run = await asyncio.to_thread(self.prepare, text)
        except AllocatorError as exc:
            await asyncio.to_thread(count_refusal, self.a, exc.code)
            await self.fail(exc)
            return
        except Exception as exc:
            await self.internal_error(exc)
            return
        listener = asyncio.create_task(self.listen())
        try:
            await self.send({"type": "accepted", "allocation_id": self.allocation_id, "policy": self.uri})
            alloc = await self.place(run)
            if alloc is not None and alloc.ended:
                # The client named an allocation that has ended: "placed" would read as a lease it holds.
                raise AllocationEnded(f"allocation {alloc.allocation_id} has ended ({alloc.state}); "
                                      "a new request needs a new id")
            if alloc is not None and alloc.state == "pending":
                alloc = await self.wait(alloc, run)
            if alloc is not None:
                await self.deliver(alloc, run)
            else:  # cancelled at the client's word (or it left: then the close goes nowhere)
                await self._close(1000)
        except AllocatorError as exc:
            await asyncio.to_thread(count_refusal, self.a, exc.code)
            await self.fail(exc)
        except Exception as exc:
            await self.cancel()  # whatever was granted never reached the client
            await self.internal_error(exc)
        finally:
            listener.cancel()

    def prepare(self, text: str) -> PolicyRun:
        """Validates the message and builds the policy run (in a thread: it may import a module)."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
            raise MalformedBody(f"the message is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidRequest("message", "expected a JSON object")
        try:
            msg = AllocateMessage.model_validate(data)
        except ValidationError as exc:
            raise from_validation_errors(exc.errors()) from None
        if msg.search:
            raise InvalidRequest("search", "similarity search is not supported; list clusters or give a label filter")
        try:
            self.settings = ExecutionSettings.model_validate(msg.settings)
        except ValidationError as exc:
            err = from_validation_errors(exc.errors())
            raise (_prefixed(err, "settings.") if isinstance(err, InvalidRequest) else err) from None
        self.uri = msg.policy_rule_uri
        inputs = msg.inputs
        metadata = dict(inputs.metadata)
        metadata.setdefault("policy_rule_uri", msg.policy_rule_uri)
        fields = inputs.allocation_fields()
        fields["metadata"] = metadata
        self.allocation_id = inputs.allocation_id or new_allocation_id()
        self.owned = not inputs.allocation_id or self._claim(inputs.allocation_id)
        try:
            req = self.a.build_request(inputs.resources_dict(), allocation_id=self.allocation_id, **fields)
        except InvalidRequest as exc:
            raise _prefixed(exc, "inputs.") from None
        selector = candidate_selector(msg.clusters, msg.filter, req.selector)
        field = "clusters" if msg.clusters else "filter" if msg.filter else "inputs.selector" if req.selector else "clusters"
        if not matching_hosts(self.a, selector):
            raise NoCandidates(field, f"no ready host matches {selector or 'the request'}")
        policy_settings = {**msg.settings, "cluster_client": ClusterClient(self.a, selector),
                           "cluster_metrics_client": ClusterMetricsClient(self.a, selector)}
        loader = self.st.policies
        policy = loader.instantiate(msg.policy_rule_uri, policy_settings, dict(msg.parameters))
        evaluate = timed_eval(self.st.policy_threads, policy, dict(msg.parameters), loader.context(msg.policy_rule_uri),
                              self.st.config.policy_timeout_s)
        return PolicyRun(self.a, req, self.allocation_id, selector, data["inputs"], evaluate, on_busy=self.settings.on_busy,
                         attempts=self.settings.max_attempts or self.st.config.policy_attempts, selector_field=field,
                         needs_candidates=type(policy) not in LEDGER_STRATEGIES)

    def _claim(self, allocation_id: str) -> bool:
        """Whether this session makes the allocation the client named: no record of that id yet,
        and no other session named it first (both may pass the first check at once)."""
        if self.a.redis.exists(self.a.keys.alloc(allocation_id)):
            return False
        if not self.a.redis.set(self.a.keys.ws_claim(allocation_id), "1", nx=True, ex=max(1, self.a.record_retention_s)):
            return False
        self.claimed = allocation_id
        return True

    def _drop_claim(self) -> None:
        """Gives back the claim on a client-named id when this session made nothing under it (a
        refusal, no candidate, the client gone before the policy answered): the client's retry
        under the same id must own what it makes. Once a record exists the id is spent and the
        claim stays until it expires."""
        try:
            if self.owned and self.claimed and not self.a.redis.exists(self.a.keys.alloc(self.claimed)):
                self.a.redis.delete(self.a.keys.ws_claim(self.claimed))
        except redis.RedisError as exc:  # it expires with the record retention
            log.warning("could not give back the claim on %s: %s", self.claimed, exc)

    async def listen(self) -> None:
        """Watches the socket after the request: a close or ``{"type": "cancel"}`` sets ``stop``."""
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                try:
                    if json.loads(msg.get("text") or "{}").get("type") == "cancel":
                        self.asked_cancel = True
                        break
                except (ValueError, AttributeError, RecursionError):
                    # RecursionError (JSON nested thousands deep) is a RuntimeError, which below
                    # means the socket is gone: a junk frame must not cancel the request.
                    continue
        except (WebSocketDisconnect, RuntimeError):
            pass
        self.stop.set()

    async def place(self, run: PolicyRun) -> Allocation | None:
        attempt = asyncio.create_task(asyncio.to_thread(run.run))
        stopped = asyncio.create_task(self.stop.wait())
        done, _ = await asyncio.wait({attempt, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if attempt not in done:
            # The client left while the policy ran: let the attempt end (it may have committed),
            # then undo whatever it created.
            try:
                await attempt
            except AllocatorError:
                return None
            self._disown_if_taken(run)
            await self.stop_here()
            return None
        alloc = attempt.result()
        self._disown_if_taken(run)
        return alloc

    def _disown_if_taken(self, run: PolicyRun) -> None:
        """Another client (REST, the CLI, the tool) made an allocation under the client-named id
        while the policy ran: the session's claim only keeps other sessions out, so what the run
        returns is theirs, and this session must never cancel it."""
        if run.existing:
            self.owned = False

    async def wait(self, alloc: Allocation, run: PolicyRun) -> Allocation | None:
        waiters = self.st.waiters
        q = waiters.subscribe(alloc.allocation_id)
        pinned = run.log[-1]["choice"]["node_id"] if run.log else None
        interval = self.settings.progress_interval_s or self.st.config.progress_interval_s
        deadline = None if self.settings.timeout_s is None else time.monotonic() + self.settings.timeout_s
        last: tuple[Any, Any] | None = None
        kind = "queued"
        next_progress = time.monotonic() + interval
        try:
            while True:
                now = time.monotonic()
                timeout = next_progress - now if deadline is None else min(next_progress, deadline) - now
                getter = asyncio.create_task(q.get())
                stopped = asyncio.create_task(self.stop.wait())
                done, _ = await asyncio.wait({getter, stopped}, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if getter not in done:
                    getter.cancel()
                if self.stop.is_set():
                    await self.stop_here()
                    return None
                if getter in done:
                    status = getter.result()
                    if status.state == "active":
                        return await asyncio.to_thread(self.a.require, alloc.allocation_id)
                    if status.state != "pending":
                        raise RequestEnded(f"the request left the line without being placed (state {status.state})")
                    cur = (status.position, _json_time(status.eta))
                    if cur != last:
                        await self.send({"type": kind, "allocation_id": alloc.allocation_id, "position": cur[0],
                                         "estimated_start_time": cur[1], "node_id": pinned})
                        kind, last, next_progress = "position", cur, time.monotonic() + interval
                    continue
                if deadline is not None and time.monotonic() >= deadline:
                    if not await self.cancel():
                        raise _not_cancelled(self.allocation_id, f"cancelled when it was not placed within {self.settings.timeout_s:g} s")
                    what = "the request was cancelled" if self.owned else "it was not this session's to cancel"
                    raise WaitTimeout(f"not placed within {self.settings.timeout_s:g} s; {what}")
                if last is not None:
                    await self.send({"type": "position", "allocation_id": alloc.allocation_id, "position": last[0],
                                     "estimated_start_time": last[1], "node_id": pinned})
                next_progress = time.monotonic() + interval
        finally:
            waiters.unsubscribe(alloc.allocation_id, q)

    async def deliver(self, alloc: Allocation, run: PolicyRun) -> None:
        if self.stop.is_set():
            await self.stop_here()
            return
        placement = await asyncio.to_thread(placement_of, self.a, alloc)
        msg = {"type": "placed", "placement": placement.model_dump() if placement else None,
               "allocation": alloc.model_dump(mode="json"), "attempts": len(run.log)}
        try:
            await self.ws.send_json(msg)
        except Exception:  # the client is gone: it never learnt of the grant, so undo it
            await self.cancel()
            return
        self.st.api_latency.labels("ws").observe(time.perf_counter() - self.t0)
        await self._close(1000)

    async def cancel(self) -> bool:
        """Cancels what this session made; False when Redis could not be reached to do it.

        A Redis restarting or failing over answers again within seconds, so the cancel is tried
        again for ``cancel_retry_s`` before what it made is left to its lease's TTL (a grant
        the client never learnt of would otherwise hold its GPUs that long)."""
        if self.allocation_id is None or not self.owned:
            return True
        deadline = time.monotonic() + self.st.config.cancel_retry_s
        while True:
            try:
                await asyncio.to_thread(self.a.cancel, self.allocation_id)
                log.info("request %s cancelled before its placement reached the client", self.allocation_id)
                return True
            except AllocatorError:  # it had ended already
                return True
            except REDIS_UNAVAILABLE as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("request %s could not be cancelled (Redis unavailable: %s: %s); its TTL ends it",
                                self.allocation_id, type(exc).__name__, exc)
                    return False
                await asyncio.sleep(min(CANCEL_RETRY_PAUSE_S, left))

    async def stop_here(self) -> None:
        """Ends the session at the client's word or on its departure, cancelling what it made. A
        client that asked to cancel is still listening: when the cancel failed it is told so
        (4503), not given the normal close that means it was done."""
        if not await self.cancel() and self.asked_cancel:
            raise _not_cancelled(self.allocation_id, "cancelled at the client's request")

    async def send(self, msg: dict[str, Any]) -> None:
        try:
            await self.ws.send_json(msg)
        except Exception:
            self.stop.set()

    async def fail(self, exc: AllocatorError) -> None:
        status = status_of(exc)
        try:
            await self.ws.send_json({"type": "error", **error_body(exc)})
        except Exception:
            return
        await self._close(4000 + status)

    async def internal_error(self, exc: Exception) -> None:
        if isinstance(exc, REDIS_UNAVAILABLE):  # not a bug: the client may retry (4503)
            log.warning("websocket request %s: Redis unavailable: %s: %s", self.allocation_id, type(exc).__name__, exc)
            await self.fail(BackendUnavailable(f"the ledger's Redis is unavailable ({type(exc).__name__}); try again shortly"))
            return
        log.error("websocket request %s failed: %s: %s", self.allocation_id, type(exc).__name__, exc, exc_info=exc)
        try:
            await self.ws.send_json({"type": "error", "error": {"code": "INTERNAL", "message": "internal server error",
                                                                "field": None}})
        except Exception:
            return
        await self._close(4500)

    async def _close(self, code: int) -> None:
        try:
            await self.ws.close(code=code)
        except Exception:
            pass
