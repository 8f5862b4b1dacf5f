"""Every Redis key name of the allocator is built here and nowhere else.

All keys of one namespace share the hash tag ``{<namespace>}`` so that each ledger script touches a
single Redis Cluster slot; several fleets (or test runs) share one Redis by using different
namespaces.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key names for one namespace."""

    namespace: str = "alloc"

    @property
    def prefix(self) -> str:
        """Prefix of every key; scripts build per-host and per-allocation keys from it."""
        return "{" + self.namespace + "}:"

    def _k(self, name: str) -> str:
        return self.prefix + name

    @property
    def hosts(self) -> str:
        return self._k("hosts")

    @property
    def gpu_idx(self) -> str:
        return self._k("gpu_idx")

    @property
    def gpu_idle(self) -> str:
        return self._k("gpu_idle")

    @property
    def gpu_ord(self) -> str:
        return self._k("gpu_ord")

    @property
    def cpu_idx(self) -> str:
        return self._k("cpu_idx")

    @property
    def ram_idx(self) -> str:
        return self._k("ram_idx")

    @property
    def allocs(self) -> str:
        return self._k("allocs")

    @property
    def active(self) -> str:
        return self._k("active")

    @property
    def expiry(self) -> str:
        return self._k("expiry")

    @property
    def done(self) -> str:
        return self._k("done")

    @property
    def events(self) -> str:
        """The outbox stream: one entry per ledger change, written by the same script."""
        return self._k("events")

    @property
    def seq(self) -> str:
        return self._k("seq")

    def host(self, host_id: str) -> str:
        return self._k("host:" + host_id)

    def host_allocs(self, host_id: str) -> str:
        return self._k("host_allocs:" + host_id)

    def alloc(self, allocation_id: str) -> str:
        return self._k("alloc:" + allocation_id)

    def ledger_keys(self) -> list[str]:
        """The fixed KEYS every ledger script receives, in the order includes/ledger.lua expects."""
        return [
            self.hosts,
            self.gpu_idx,
            self.gpu_idle,
            self.gpu_ord,
            self.cpu_idx,
            self.ram_idx,
            self.allocs,
            self.active,
            self.expiry,
            self.done,
            self.events,
            self.seq,
        ]

    def pattern(self) -> str:
        """Glob matching every key of the namespace (for SCAN in cleanup and tests)."""
        return "{" + self.namespace.replace("[", "\\[").replace("*", "\\*").replace("?", "\\?") + "}:*"
