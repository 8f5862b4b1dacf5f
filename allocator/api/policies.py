"""Pluggable placement policies (seed 003): loading them by ``policy_rule_uri``, checking what
they return, and the built-in ones.

A policy is a class in the seed's shape::

    class MyPolicy:
        def __init__(self, rule_id, settings, parameters): ...
        def eval(self, parameters, input_data, context) -> dict:
            return {"cluster_id": "lab", "node_id": "gpu-a", "gpus": ["0", "2"]}

``input_data`` holds ``cluster_data`` ({cluster_id: {"data": static inventory per node,
"cluster_metrics": live free capacity per node}}), ``candidates`` (the same hosts as a flat
list), ``request`` (the normalised request) and ``inputs`` (the message's inputs as sent).
``context`` is a dict kept per policy in the API process across requests (the seed's "external
cache"). The output may name a cluster, a node, GPUs (indexes or uuids) and a ledger
``strategy``; whatever it leaves out the ledger decides: ``{}`` lets the request's strategy place
it among all candidates, ``{"cluster_id": c}`` within cluster c, ``{"node_id": n}`` on node n.

Loading never imports what a caller merely names: a uri is a built-in name, an entry point of
group ``allocator.policies`` (installed by the operator), or a dotted path inside a module the
operator allowed (``ALLOCATOR_POLICY_MODULES``).
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from ..errors import InvalidRequest
from ..models import Strategy
from .errors import PolicyError

POLICY_GROUP = "allocator.policies"


class LedgerStrategy:
    """A built-in strategy behind the policy interface: the ledger's own index walk (Lua) places
    the request among the candidates, exactly as ``Allocator.allocate(strategy=...)`` would."""

    strategy = "best_fit"

    def __init__(self, rule_id: str | None = None, settings: dict[str, Any] | None = None,
                 parameters: dict[str, Any] | None = None) -> None:
        self.rule_id, self.settings, self.parameters = rule_id, settings or {}, parameters or {}

    def eval(self, parameters: dict[str, Any], input_data: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        return {"strategy": self.strategy}


class BestFit(LedgerStrategy):
    """Tightest fit: the GPU (or host) with the least free capacity that still fits."""

    strategy = "best_fit"


class FirstFit(LedgerStrategy):
    """First fit in host registration order."""

    strategy = "first_fit"


class WorstFit(LedgerStrategy):
    """Spread: the GPU (or host) with the most free capacity."""

    strategy = "worst_fit"


class PriorityPreempt(LedgerStrategy):
    """Best fit, and may preempt strictly lower-priority work when nothing fits."""

    strategy = "priority"


class MostFreeMemory(LedgerStrategy):
    """Example of a policy decided in Python: the node with the most free GPU memory (most free
    CPU for CPU-only requests) that can take the whole request now, and on it the GPUs with the
    most free memory. Returns ``{}`` (let the ledger decide, or wait) when no node fits."""

    def eval(self, parameters: dict[str, Any], input_data: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        r = input_data["request"]
        best: tuple[float, dict[str, Any], list[dict[str, Any]]] | None = None
        for c in input_data["candidates"]:
            # A host with no free CPU or no free RAM takes no new work (the ledger parks it), even
            # a request for none.
            if c["cpu_free"] <= 0 or c["ram_free_mb"] <= 0 or c["cpu_free"] < r["cpu_cores"] or c["ram_free_mb"] < r["ram_mb"]:
                continue
            gpus = _pick(c, r)
            if gpus is None:
                continue
            score = sum(g["free_mb"] for g in c["gpus"]) if r["gpus"] else c["cpu_free"]
            if best is None or score > best[0]:
                best = (score, c, gpus)
        if best is None:
            return {}
        _, c, gpus = best
        return {"cluster_id": c["cluster_id"], "node_id": c["node_id"], "gpus": [str(g["index"]) for g in gpus]}


def _pick(c: dict[str, Any], r: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The request's GPUs on node c, most free memory first, or None when too few fit. Below
    critical priority, idle GPUs only while more than the node's reserve stay idle (the ledger
    refuses the rest)."""
    fit = sorted((g for g in c["gpus"] if _gpu_ok(g, r)), key=lambda g: (-g["free_mb"], g["index"]))
    idle_left = None
    if c.get("reserve_gpus") and r["priority"] != "critical":
        idle_left = sum(1 for g in c["gpus"] if g["holders"] == 0 and g["free_mb"] > 0) - c["reserve_gpus"]
    out: list[dict[str, Any]] = []
    for g in fit:
        if len(out) == r["gpus"]:
            break
        if idle_left is not None and g["holders"] == 0:
            if idle_left <= 0:
                continue
            idle_left -= 1
        out.append(g)
    return out if len(out) == r["gpus"] else None


def _gpu_ok(g: dict[str, Any], r: dict[str, Any]) -> bool:
    if r["gpu_model"] and g["model"] not in r["gpu_model"]:
        return False
    if r["gpu_memory_mb"] is None:
        return g["holders"] == 0 and g["free_mb"] > 0
    return g["free_mb"] >= r["gpu_memory_mb"]


BUILTINS: dict[str, type] = {
    "best_fit": BestFit,
    "first_fit": FirstFit,
    "worst_fit": WorstFit,
    "spread": WorstFit,
    "priority": PriorityPreempt,
    "most_free_memory": MostFreeMemory,
}


@dataclass
class PolicyChoice:
    """A checked policy output."""

    cluster_id: str | None = None
    node_id: str | None = None
    gpus: list[int | str] = field(default_factory=list)
    strategy: Strategy | None = None
    raw: dict[str, Any] = field(default_factory=dict)


class PolicyLoader:
    """Resolves ``policy_rule_uri`` to a class (cached) and keeps each policy's context dict."""

    def __init__(self, allowed_modules: tuple[str, ...]) -> None:
        self.allowed_modules = allowed_modules
        self._cache: dict[str, Any] = {}
        self._contexts: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def context(self, uri: str) -> dict[str, Any]:
        with self._lock:
            return self._contexts.setdefault(uri, {})

    def resolve(self, uri: str) -> Any:
        with self._lock:
            if uri in self._cache:
                return self._cache[uri]
        target = self._resolve(uri.strip())
        with self._lock:
            self._cache[uri] = target
        return target

    def _resolve(self, uri: str) -> Any:
        if uri in BUILTINS:
            return BUILTINS[uri]
        for ep in entry_points(group=POLICY_GROUP):
            if ep.name == uri:
                try:
                    return ep.load()
                except Exception as exc:  # an installed plug-in that fails to import
                    raise PolicyError(f"policy entry point {uri!r} failed to load: {type(exc).__name__}: {exc}") from None
        module, sep, attr = uri.partition(":")
        if not sep:
            module, _, attr = uri.rpartition(".")
        if not module or not attr or not all(p.isidentifier() for p in [*module.split("."), attr]):
            raise PolicyError(f"unknown policy {uri!r}: not a built-in ({', '.join(sorted(BUILTINS))}), "
                              f"an {POLICY_GROUP} entry point, or a dotted path module:Class")
        if not any(module == m or module.startswith(m + ".") for m in self.allowed_modules):
            raise PolicyError(f"policy module {module!r} is not allowed; the operator allows: "
                              f"{', '.join(self.allowed_modules)} (ALLOCATOR_POLICY_MODULES)")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise PolicyError(f"policy {uri!r} cannot be loaded: {exc}") from None
        except Exception as exc:
            raise PolicyError(f"policy module {module!r} failed to import: {type(exc).__name__}: {exc}") from None
        return obj

    def instantiate(self, uri: str, settings: dict[str, Any], parameters: dict[str, Any]) -> Any:
        """A policy object for one request: ``Class(rule_id, settings, parameters)`` (the seed's
        constructor), or ``Class()`` for a class that takes no arguments, or the object itself."""
        target = self.resolve(uri)
        if not callable(getattr(target, "eval", None)):
            # Checked before anything named is built: a helper class of an allowed module (or one
            # it imports, such as Allocator) is not run for a request it would then refuse.
            raise PolicyError(f"policy {uri!r} has no eval(parameters, input_data, context) method")
        if inspect.isclass(target):
            try:
                n = len([p for p in inspect.signature(target).parameters.values()
                         if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)])
                obj = target(uri, settings, parameters) if n >= 3 else target()
            except Exception as exc:
                raise PolicyError(f"policy {uri!r} failed to initialise: {type(exc).__name__}: {exc}") from None
        else:
            obj = target
        if not callable(getattr(obj, "eval", None)):
            raise PolicyError(f"policy {uri!r} has no eval(parameters, input_data, context) method")
        return obj


def check_output(raw: Any, candidates: Mapping[str, Any], request_gpus: int) -> PolicyChoice:
    """Validates a policy's output against the candidates; ``PolicyError`` names what is wrong.

    ``candidates`` maps node id -> an object with ``cluster_id`` and ``gpus`` (each with
    ``index`` and ``uuid``)."""
    if isinstance(raw, (list, tuple)):
        if len(raw) != 1:
            raise PolicyError(f"the policy returned {len(raw)} placements; one request takes exactly one",
                              field="policy_output")
        raw = raw[0]
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise PolicyError(f"the policy returned {type(raw).__name__}; expected an object "
                          "{cluster_id, node_id, gpus}", field="policy_output")
    out = PolicyChoice(raw=dict(raw))
    for key in ("cluster_id", "node_id"):
        v = raw.get(key)
        if v is not None and (not isinstance(v, str) or not v):
            raise PolicyError(f"{key} must be a non-empty string or null, got {v!r}", field=f"policy_output.{key}")
        setattr(out, key, v)
    gpus = raw.get("gpus")
    if gpus is not None:
        if not isinstance(gpus, (list, tuple)):
            raise PolicyError(f"gpus must be a list of GPU indexes or uuids, got {gpus!r}", field="policy_output.gpus")
        for g in gpus:
            if isinstance(g, bool) or not isinstance(g, (int, str)) or g == "":
                raise PolicyError(f"gpus must hold GPU indexes or uuids, got {g!r}", field="policy_output.gpus")
            out.gpus.append(int(g) if isinstance(g, str) and g.isascii() and g.isdigit() else g)
    if raw.get("strategy") is not None:
        try:
            out.strategy = Strategy.parse(raw["strategy"])
        except InvalidRequest as exc:
            raise PolicyError(exc.reason, field="policy_output.strategy") from None
    if out.node_id is not None:
        node = candidates.get(out.node_id)
        if node is None:
            raise PolicyError(f"node_id {out.node_id!r} is not one of the candidate hosts "
                              f"({', '.join(sorted(candidates)[:20])})", field="policy_output.node_id")
        if out.cluster_id is not None and node.cluster_id != out.cluster_id:
            raise PolicyError(f"node {out.node_id!r} is in cluster {node.cluster_id!r}, not {out.cluster_id!r}",
                              field="policy_output.cluster_id")
        out.cluster_id = node.cluster_id
        if out.gpus:
            if len(out.gpus) != request_gpus:
                raise PolicyError(f"the policy chose {len(out.gpus)} GPU(s) but the request needs {request_gpus}",
                                  field="policy_output.gpus")
            known = {g.index for g in node.gpus} | {g.uuid for g in node.gpus}
            for g in out.gpus:
                if g not in known:
                    raise PolicyError(f"node {out.node_id!r} has no GPU {g!r}", field="policy_output.gpus")
            if len(set(out.gpus)) != len(out.gpus):
                raise PolicyError("a GPU was chosen twice", field="policy_output.gpus")
    else:
        if out.gpus:
            raise PolicyError("gpus were chosen without a node_id", field="policy_output.gpus")
        if out.cluster_id is not None and out.cluster_id not in {c.cluster_id for c in candidates.values()}:
            raise PolicyError(f"cluster_id {out.cluster_id!r} is not a candidate cluster", field="policy_output.cluster_id")
    return out
