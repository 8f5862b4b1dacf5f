"""Host agent and reaper: inventory providers (NVML, psutil, static file), heartbeats, lost-host
reclaim, fencing of stale grants, and the GPU memory watchdog. See docs/agent.md."""

from .daemon import Agent, RoundReport
from .fencing import GrantStatus, StaleGrant, check_grant, grant_is_current, require_current_grant
from .inventory import GpuProcess, GpuUnit, HostInventory, InvalidInventory
from .providers import LocalProvider, NvmlProvider, PsutilProvider
from .reaper import LostHost, mark_lost, reap_lost_hosts, run_reaper
from .static import StaticProvider, load_inventory_file
from .watchdog import Watchdog

__all__ = [
    "Agent",
    "GpuProcess",
    "GpuUnit",
    "GrantStatus",
    "HostInventory",
    "InvalidInventory",
    "LocalProvider",
    "LostHost",
    "NvmlProvider",
    "PsutilProvider",
    "RoundReport",
    "StaleGrant",
    "StaticProvider",
    "Watchdog",
    "check_grant",
    "grant_is_current",
    "load_inventory_file",
    "mark_lost",
    "reap_lost_hosts",
    "require_current_grant",
    "run_reaper",
]
