"""Policies the API tests load by dotted path (this module is allowed by the test config).

Each is a class in seed 003's shape: ``__init__(rule_id, settings, parameters)`` and
``eval(parameters, input_data, context)``.
"""

from __future__ import annotations

import time
from typing import Any

from allocator import Allocator


class SeedShaped:
    def __init__(self, rule_id: str, settings: dict[str, Any], parameters: dict[str, Any]) -> None:
        self.rule_id, self.settings, self.parameters = rule_id, settings, parameters


class PickNode(SeedShaped):
    """Good policy: the node (and GPUs) named in the parameters; counts its runs in ``context``."""

    def eval(self, parameters: dict[str, Any], input_data: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        context["runs"] = context.get("runs", 0) + 1
        node = parameters["node"]
        cluster = next(c["cluster_id"] for c in input_data["candidates"] if c["node_id"] == node)
        out: dict[str, Any] = {"cluster_id": cluster, "node_id": node}
        if parameters.get("gpus") is not None:
            out["gpus"] = parameters["gpus"]
        return out


class SeesClusters(SeedShaped):
    """Checks the seed-003 input shape and the injected clients, then lets the ledger decide."""

    def eval(self, parameters: dict[str, Any], input_data: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        clusters = input_data["cluster_data"]
        for cid, entry in clusters.items():
            assert set(entry) == {"data", "cluster_metrics"}
            ok, data = self.settings["cluster_client"].read_cluster(cid)
            assert ok and set(data["nodes"]) == set(entry["data"]["nodes"])
            assert set(self.settings["cluster_metrics_client"].get_cluster(cid)) == set(entry["cluster_metrics"]["nodes"])
        assert input_data["inputs"]["note"] == "for the policy"
        return {"cluster_id": sorted(clusters)[0]}


class Raising(SeedShaped):
    def eval(self, parameters: dict[str, Any], input_data: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("policy exploded")


class WrongOutput(SeedShaped):
    """Returns what parameters["output"] says (a string, a list of two, an unknown node, ...)."""

    def eval(self, parameters: dict[str, Any], input_data: dict[str, Any], context: dict[str, Any]) -> Any:
        return parameters["output"]


class Slow(SeedShaped):
    def eval(self, parameters: dict[str, Any], input_data: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        time.sleep(parameters.get("seconds", 2.0))
        return {}


class Racing(SeedShaped):
    """Conflict: on its first evaluation another client takes the GPU the policy then chooses
    (as a concurrent allocation would); on the retry it picks a GPU that is still free."""

    def eval(self, parameters: dict[str, Any], input_data: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        node = parameters["node"]
        if input_data["attempt"] == 1:
            rival = Allocator(parameters["redis_url"], namespace=parameters["namespace"])
            rival.allocate({"gpus": 1}, selector={"cluster": "lab"}, allocation_id=parameters["rival_id"],
                           strategy="first_fit")
            rival.redis.close()
            return {"node_id": node, "gpus": [0]}
        c = next(c for c in input_data["candidates"] if c["node_id"] == node)
        free = [g for g in c["gpus"] if g["holders"] == 0]
        return {"node_id": node, "gpus": [free[0]["index"]]}


class AlwaysNode(SeedShaped):
    """Always the node in parameters, whether or not it has room (conflicts every time when full)."""

    def eval(self, parameters: dict[str, Any], input_data: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        return {"node_id": parameters["node"]}


class NotAPolicy:
    """A helper of an allowed module: no eval. Counts its constructions, which must be none."""

    built = 0

    def __init__(self, *args: Any) -> None:
        NotAPolicy.built += 1
