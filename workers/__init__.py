"""RQ worker class and job-side helpers (GPU/core pinning, release after the job)."""
