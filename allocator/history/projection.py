"""Folding outbox events into history rows: pure functions, no I/O.

The recorder stores every event as it came (table ``events``) and folds the ones it knows into
``allocations``, ``placements`` and ``hosts``. Events normally arrive in stream order; when they
do not (a stale consumer's entries claimed by another), a change of state is applied only when the
event is newer than the one that set the row's state (``state_event_id``; started and finished
change no state), a placement's grant comes from the latest placement's ``allocated`` event
whenever it arrives, and fields that never change once known (submission time, task type, a
host's inventory) are filled in whichever order they come.

Event types (the ``type`` field; ``data`` is JSON):
- allocation life: submitted, allocated, released, cancelled, requeued, started, finished;
- hosts: host_registered, host_updated, host_draining, host_resumed, host_lost, host_removed;
- anything else (preempted, restored, recovery_*, types added later) is kept in ``events`` only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..models import ENDED_STATES
from .db import dt_to_ms, ms_to_dt

ALLOCATION_EVENTS = frozenset({"submitted", "allocated", "released", "cancelled", "requeued", "started", "finished"})
HOST_EVENTS = frozenset({"host_registered", "host_updated", "host_draining", "host_resumed", "host_lost", "host_removed"})
HOST_STATE_BY_EVENT = {"host_draining": "draining", "host_resumed": "ready", "host_lost": "lost", "host_removed": "removed"}


def parse_stream_id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class OutboxEvent:
    """One outbox entry, decoded. ``data`` is the parsed JSON (``{"raw": text}`` if it was not JSON),
    with any further fields of the entry (e.g. ``request``, ``metadata``) parsed into it."""

    stream_id: str
    ms: int
    seq: int
    type: str
    subject: str
    ts: datetime | None
    data: Any

    @classmethod
    def parse(cls, stream_id: str, fields: dict[str, str]) -> OutboxEvent:
        raw = fields.get("data")
        data: Any
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"raw": raw}
        extra = {k: v for k, v in fields.items() if k not in ("type", "id", "ts", "data")}
        if extra:
            # Scripts may carry large JSON texts (request, metadata) as fields beside data.
            if not isinstance(data, dict):
                data = {"data": data}
            for k, v in extra.items():
                try:
                    data[k] = json.loads(v)
                except (TypeError, ValueError):
                    data[k] = v
        ts_field = fields.get("ts")
        try:
            ts = ms_to_dt(ts_field)
        except ValueError:
            ts = None
        ms, seq = parse_stream_id(stream_id)
        return cls(stream_id, ms, seq, fields.get("type") or "unknown", fields.get("id") or "", ts or ms_to_dt(ms), data)

    @property
    def position(self) -> tuple[int, int]:
        return self.ms, self.seq

    @property
    def fields(self) -> dict[str, Any]:
        """``data`` as a mapping (empty when the event carried something else)."""
        return self.data if isinstance(self.data, dict) else {}

    def row(self, namespace: str, recorded_at: datetime) -> dict[str, Any]:
        """The ``events`` table row."""
        return {"namespace": namespace, "stream_id": self.stream_id, "stream_ms": self.ms, "stream_seq": self.seq,
                "type": self.type[:64], "subject": self.subject[:256], "ts": self.ts, "data": self.data,
                "recorded_at": recorded_at}


def _list(v: Any) -> list[Any]:
    """cjson encodes an empty Lua table as {}; anything that is not a list is an empty list."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return []
    return v if isinstance(v, list) else []


def _obj(v: Any) -> dict[str, Any]:
    """A JSON object given as text (the ledger passes metadata/request as JSON text) or as a dict."""
    if isinstance(v, str):
        try:
            v = json.loads(v) if v else {}
        except ValueError:
            return {"raw": v}
    return v if isinstance(v, dict) else {}


def _int(v: Any, default: int | None = 0) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return default


def _text(v: Any) -> str | None:
    return str(v) if v not in (None, "") else None


def _is_newer(ev: OutboxEvent, row: dict[str, Any]) -> bool:
    last = row.get("last_event_id")
    return last is None or ev.position > parse_stream_id(last)


def _claims(ev: OutboxEvent, row: dict[str, Any], column: str) -> bool:
    """Whether ev is newer than the event recorded in ``column``; then it is recorded there."""
    last = row.get(column)
    if last is not None and ev.position <= parse_stream_id(last):
        return False
    row[column] = ev.stream_id
    return True


def _sets_state(ev: OutboxEvent, row: dict[str, Any]) -> bool:
    """Whether ev may change the row's state: newer than the event that set it. Claims it."""
    return _claims(ev, row, "state_event_id")


def _touch(ev: OutboxEvent, row: dict[str, Any]) -> None:
    if _is_newer(ev, row):
        row["last_event_id"] = ev.stream_id
    first = row.get("first_event_id")
    if first is None or ev.position < parse_stream_id(first):
        row["first_event_id"] = ev.stream_id


def new_allocation(namespace: str, allocation_id: str) -> dict[str, Any]:
    return {"namespace": namespace, "allocation_id": allocation_id, "task_id": None, "task_type": None, "owner": None,
            "priority": None, "strategy": None, "kind": None, "state": "pending", "release_reason": None,
            "outcome": None, "host_id": None, "host_gen": None, "gpus": [], "gpu_count": 0, "gpu_memory_mb": 0,
            "cores": [], "cpu_millis": 0, "ram_mb": 0, "ttl_ms": None, "expires_at": None, "request": {},
            "metadata": {}, "submitted_at": None, "placed_at": None, "started_at": None, "finished_at": None,
            "released_at": None, "wait_ms": None, "run_ms": None, "requeues": 0, "first_event_id": None,
            "last_event_id": None, "state_event_id": None, "updated_at": None}


def _fill(row: dict[str, Any], d: dict[str, Any], *names: str) -> None:
    """Copies the task's descriptive fields from an event when it has them."""
    for name in names:
        v = _text(d.get(name))
        if v is not None:
            row[name] = v[:256]


def fold_allocation(row: dict[str, Any], ev: OutboxEvent) -> None:
    """Applies one allocation-life event to the row (a dict of ``allocations`` columns)."""
    d = ev.fields
    newer = _is_newer(ev, row)
    kind = ev.type
    if kind == "submitted":
        row["submitted_at"] = ev.ts
        _fill(row, d, "task_id", "task_type", "owner", "kind")
        if d.get("priority") is not None:
            row["priority"] = _int(d.get("priority"), None)
        if d.get("request"):
            row["request"] = _obj(d.get("request"))
    elif kind == "allocated":
        _fill(row, d, "task_id", "task_type", "owner", "strategy", "kind")
        if d.get("priority") is not None:
            row["priority"] = _int(d.get("priority"), None)
        if d.get("request"):
            row["request"] = _obj(d.get("request"))
        if d.get("metadata"):
            row["metadata"] = _obj(d.get("metadata"))
        if row["submitted_at"] is None:
            row["submitted_at"] = ms_to_dt(d.get("created")) or ev.ts
        # The grant of the latest placement, whenever its event arrives: a released event that came
        # first set placed_at to this same placement's time (its "activated").
        if row["placed_at"] is None or ev.ts >= row["placed_at"]:
            row.update(grant_columns(d), host_gen=_int(d.get("host_gen"), None), gpus=_list(d.get("gpus")),
                       cores=_list(d.get("cores")), ttl_ms=_int(d.get("ttl_ms"), None),
                       expires_at=ms_to_dt(d.get("expires")), placed_at=ev.ts)
        if _sets_state(ev, row):
            row.update(state="active", released_at=None, release_reason=None)
    elif kind == "released":
        if row["host_id"] is None:
            row["host_id"] = _text(d.get("host"))
        _fill(row, d, "task_id")
        if row["placed_at"] is None:
            row["placed_at"] = ms_to_dt(d.get("activated"))
        if row["submitted_at"] is None:
            row["submitted_at"] = ms_to_dt(d.get("created"))
        if _sets_state(ev, row):
            row.update(state=_text(d.get("state")) or "released", release_reason=_text(d.get("reason")), released_at=ev.ts)
        elif row["state"] in ENDED_STATES and row["released_at"] is None:
            # A newer event ended the row first (a "finished" carrying the state failed, for a task
            # failed by its host's loss): the release still says why and when.
            row.update(release_reason=row["release_reason"] or _text(d.get("reason")), released_at=ev.ts)
    elif kind == "cancelled":
        if _sets_state(ev, row):
            # The reason says why it left the line: cancelled, or job_gone (its RQ job vanished).
            row.update(state="cancelled", release_reason=_text(d.get("reason")) or "cancelled", released_at=ev.ts)
    elif kind == "requeued":
        row["requeues"] = (row.get("requeues") or 0) + 1
        if _sets_state(ev, row):
            row.update(state="pending", released_at=None, release_reason=None, started_at=None, finished_at=None, outcome=None)
    elif kind == "started":
        if newer or row["started_at"] is None:
            row["started_at"] = ms_to_dt(d.get("started")) or ev.ts
        if newer and "expires" in d:  # the worker's claim moved the deadline to cover the run
            row["expires_at"] = ms_to_dt(d.get("expires"))
    elif kind == "finished":
        if newer or row["outcome"] is None:
            row["outcome"] = _text(d.get("outcome") or d.get("status"))
            row["finished_at"] = ev.ts
        if d.get("state") in ENDED_STATES and _sets_state(ev, row):  # the reaper failing a task by its on_host_lost policy
            row["state"] = d["state"]
    _touch(ev, row)
    derive_durations(row)


def derive_durations(row: dict[str, Any]) -> None:
    """wait = placed - submitted (0 when placed at once); run = released - started (or - placed)."""
    placed, submitted = dt_to_ms(row.get("placed_at")), dt_to_ms(row.get("submitted_at"))
    row["wait_ms"] = None if placed is None else max(0, placed - submitted) if submitted is not None else 0
    released = dt_to_ms(row.get("released_at"))
    began = dt_to_ms(row.get("started_at")) or placed
    row["run_ms"] = max(0, released - began) if released is not None and began is not None else None


def placement_key(ev: OutboxEvent) -> int | None:
    """The placement an event belongs to: its placement time in ms."""
    if ev.type == "allocated":
        return dt_to_ms(ev.ts)
    if ev.type == "released":
        return _int(ev.fields.get("activated"), None)
    return None


def grant_columns(d: dict[str, Any]) -> dict[str, Any]:
    """Host and sizes of the grant an ``allocated`` event carries."""
    gpus, cores = _list(d.get("gpus")), _list(d.get("cores"))
    return {"host_id": _text(d.get("host")), "gpu_count": len(gpus),
            "gpu_memory_mb": sum(_int(g.get("memory_mb")) or 0 for g in gpus if isinstance(g, dict)),
            "cpu_millis": len(cores) * 1000 + (_int(d.get("shared_millis")) or 0), "ram_mb": _int(d.get("ram_mb")) or 0}


def gpu_share_milli(d: dict[str, Any]) -> int:
    """Thousandths of a GPU an ``allocated`` event's grant holds: 1000 for each whole GPU, a
    slice its share of its GPU's memory (``total``, which slices carry since this was counted).
    A slice recorded without it counts as a whole GPU, as every grant did before."""
    milli = 0
    for g in _list(d.get("gpus")):
        if not isinstance(g, dict):
            continue
        total, mb = _int(g.get("total")), _int(g.get("memory_mb")) or 0
        milli += 1000 if g.get("whole") or not total else min(1000, max(0, round(1000 * mb / total)))
    return milli


def fold_placement(row: dict[str, Any] | None, ev: OutboxEvent, alloc: dict[str, Any], placed_ms: int) -> dict[str, Any]:
    """Applies an allocated/released event to the ``placements`` row of that placement. Its grant
    comes from its own ``allocated`` event: the allocation's row holds its newest placement's,
    which is another one when the events of an earlier placement arrive late."""
    if row is None:
        row = {"namespace": alloc["namespace"], "allocation_id": alloc["allocation_id"], "placed_ms": placed_ms,
               "host_id": alloc["host_id"], "owner": alloc["owner"], "task_type": alloc["task_type"],
               "gpu_count": 0, "gpu_memory_mb": 0, "gpu_share_milli": None, "cpu_millis": 0, "ram_mb": 0,
               "placed_at": ms_to_dt(placed_ms), "released_at": None, "release_reason": None}
    if ev.type == "allocated":
        row.update(grant_columns(ev.fields), owner=alloc["owner"], task_type=alloc["task_type"],
                   gpu_share_milli=gpu_share_milli(ev.fields))
    elif row["gpu_count"] == row["cpu_millis"] == row["ram_mb"] == 0 and dt_to_ms(alloc.get("placed_at")) == placed_ms:
        # Its release came first: the allocation's row may already hold this placement's grant.
        for k in ("host_id", "owner", "task_type", "gpu_count", "gpu_memory_mb", "cpu_millis", "ram_mb"):
            row[k] = alloc[k]
    if ev.type == "released":
        row["released_at"] = ev.ts
        row["release_reason"] = _text(ev.fields.get("reason"))
    return row


def new_host(namespace: str, host_id: str) -> dict[str, Any]:
    return {"namespace": namespace, "host_id": host_id, "state": "ready", "drained_by": None, "state_event_id": None,
            "drain_event_id": None,
            "labels": {}, "spec": {}, "gpu_count": 0,
            "gpu_memory_mb": 0, "cpu_cores": 0, "ram_mb": 0, "registered_at": None, "updated_at": None,
            "removed_at": None, "last_event_id": None}


def fold_host(row: dict[str, Any], ev: OutboxEvent) -> None:
    """Applies one host event to the row (a dict of ``hosts`` columns).

    A host's state has two parts, each following the newest event that sets it, so events that
    arrive out of order fold as in order: whether it is up, lost or removed (registrations,
    losses, removals: ``state_event_id``), and whether it drains and for whom (drains, resumes,
    and removals, which end a drain: ``drain_event_id``; a loss ends none, as in the ledger, which
    keeps an operator's drain through it and announces the end of an agent's at the host's next
    registration). ``state`` is lost or removed, else draining or ready; a lost row keeps who
    drained it."""
    newer = _is_newer(ev, row)
    if ev.type in ("host_registered", "host_updated"):
        if row["registered_at"] is None or (ev.type == "host_registered" and ev.ts < row["registered_at"]):
            row["registered_at"] = ev.ts  # the first registration, whatever order the events come in
        # The inventory of the newest registration, or of an older one while the row has none (a
        # drain or a loss folded before the registration that preceded it).
        if newer or not row["spec"]:
            spec = ev.fields
            gpus = _list(spec.get("gpus"))
            row.update(spec=spec, labels=spec.get("labels") if isinstance(spec.get("labels"), dict) else {},
                       gpu_count=len(gpus), gpu_memory_mb=sum(_int(g.get("memory_mb")) or 0 for g in gpus if isinstance(g, dict)),
                       cpu_cores=len(_list(spec.get("cores"))), ram_mb=_int(spec.get("ram_mb")) or 0)
        if _claims(ev, row, "state_event_id") and row["state"] in ("removed", "lost"):
            row["state"], row["removed_at"] = "ready", None  # back after a loss or a removal
    elif ev.type in ("host_lost", "host_removed"):
        if _claims(ev, row, "state_event_id"):
            row["state"] = HOST_STATE_BY_EVENT[ev.type]
            row["removed_at"] = ev.ts if ev.type == "host_removed" else None
        # A removal ends any drain. A loss ends none here: the ledger keeps an operator's drain
        # through it and announces the end of an agent's at the host's registration (host_resumed).
        if ev.type == "host_removed" and _claims(ev, row, "drain_event_id"):
            row["drained_by"] = None
    elif ev.type in ("host_draining", "host_resumed") and _claims(ev, row, "drain_event_id"):
        # Events written before the drainer was recorded count as an operator's drain.
        row["drained_by"] = (_text(ev.fields.get("by")) or "operator") if ev.type == "host_draining" else None
    if row["state"] not in ("removed", "lost"):
        row["state"] = "draining" if row["drained_by"] else "ready"
    if newer:
        row["updated_at"] = ev.ts
        row["last_event_id"] = ev.stream_id
