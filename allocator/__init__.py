"""rq-allocator: a Redis-backed allocator of GPU memory, CPU cores and RAM for queued tasks."""

from .client import Allocator
from .errors import (
    AllocationNotFound,
    AllocatorError,
    HostBusy,
    HostNotFound,
    InsufficientResources,
    InvalidRequest,
    NotFound,
    Refused,
)
from .models import Allocation, AllocationRequest, Capacity, GpuSpec, HostSpec, Priority, Resources, Strategy
from .seeds import AllocationManager, ResourceAllocator, allocate_resources

__all__ = [
    "Allocation",
    "AllocationManager",
    "AllocationNotFound",
    "AllocationRequest",
    "Allocator",
    "AllocatorError",
    "Capacity",
    "GpuSpec",
    "HostBusy",
    "HostNotFound",
    "HostSpec",
    "InsufficientResources",
    "InvalidRequest",
    "NotFound",
    "Priority",
    "Refused",
    "ResourceAllocator",
    "Resources",
    "Strategy",
    "allocate_resources",
]
__version__ = "0.1.0"
