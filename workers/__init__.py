"""RQ worker class and job-side helpers (GPU/core pinning, release after the job)."""

from .worker import ResourceWorker

__all__ = ["ResourceWorker"]
