"""The real providers on this machine: psutil (cores, RAM, cgroup quotas) and NVML without a driver.

No GPU machine is available for this project's tests: the NVML provider's GPU path is not run
here; its no-driver path is, with the real nvidia-ml-py module.
"""

from __future__ import annotations

import logging
import os

import psutil
import pytest

from allocator.agent import Agent, LocalProvider, NvmlProvider, PsutilProvider
from allocator.agent.providers import cgroup_cpu_limit, cgroup_memory_limit_mb

MIB = 1024 * 1024


def _nvml_works() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.fixture
def no_cgroup(tmp_path):
    """An empty cgroup tree: no quota, no memory limit."""
    (tmp_path / "cgroup").mkdir()
    (tmp_path / "self").write_text("0::/\n")
    return tmp_path / "cgroup", tmp_path / "self"


def test_psutil_provider_reports_this_machines_cores_and_ram(no_cgroup):
    root, self_cg = no_cgroup
    p = PsutilProvider(root, self_cg)
    cores, info = p.cores()
    assert cores == sorted(os.sched_getaffinity(0)) and info["cpu_quota"] is None
    ram, _ = p.ram_mb()
    assert ram == psutil.virtual_memory().total // MIB


def test_psutil_provider_with_the_real_cgroups_stays_within_affinity_and_ram():
    cores, _ = PsutilProvider().cores()
    ram, _ = PsutilProvider().ram_mb()
    assert cores and set(cores) <= os.sched_getaffinity(0)
    assert 0 < ram <= psutil.virtual_memory().total // MIB


def test_cgroup_v2_cpu_quota_limits_the_cores(tmp_path):
    (tmp_path / "kubepods" / "pod1").mkdir(parents=True)
    (tmp_path / "kubepods" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "kubepods" / "pod1" / "memory.max").write_text(str(512 * MIB) + "\n")
    self_cg = tmp_path / "self"
    self_cg.write_text("0::/kubepods/pod1\n")
    assert cgroup_cpu_limit(tmp_path, self_cg) == 1.5
    assert cgroup_memory_limit_mb(tmp_path, self_cg) == 512
    cores, info = PsutilProvider(tmp_path, self_cg).cores()
    assert cores == sorted(os.sched_getaffinity(0))[:1] and info["cpu_quota"] == 1.5
    assert PsutilProvider(tmp_path, self_cg).ram_mb()[0] == min(512, psutil.virtual_memory().total // MIB)


def test_cgroup_v1_cfs_quota_and_memory_limit(tmp_path):
    (tmp_path / "cpu" / "docker" / "c1").mkdir(parents=True)
    (tmp_path / "cpu" / "docker" / "c1" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "docker" / "c1" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "docker" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "docker" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # "no limit"
    self_cg = tmp_path / "self"
    self_cg.write_text("4:memory:/\n2:cpu,cpuacct:/docker/c1\n")
    assert cgroup_cpu_limit(tmp_path, self_cg) == 3.0
    assert cgroup_memory_limit_mb(tmp_path, self_cg) is None


def test_quota_below_one_cpu_still_offers_one_core(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    self_cg = tmp_path / "self"
    self_cg.write_text("0::/\n")
    assert len(PsutilProvider(tmp_path, self_cg).cores()[0]) == 1


def test_nvml_without_a_driver_reports_zero_gpus_and_warns(caplog):
    if _nvml_works():
        pytest.skip("an NVIDIA driver is present: the no-driver path cannot be exercised here")
    import pynvml  # the real nvidia-ml-py module, not a stand-in

    assert pynvml.__file__.endswith("pynvml.py")
    p = NvmlProvider()
    with caplog.at_level(logging.WARNING):
        assert p.gpus() == [] and p.gpus() == []
    assert p.failure and "NVMLError" in p.failure
    assert [r.levelno for r in caplog.records if "NVML unavailable" in r.message] == [logging.WARNING]  # once
    p.close()


def test_local_host_without_a_driver_registers_as_cpu_only(alloc, caplog):
    if _nvml_works():
        pytest.skip("an NVIDIA driver is present")
    agent = Agent(alloc, LocalProvider("this-machine", labels={"zone": "local"}))
    rep = agent.run_once()
    assert rep.registered == ["this-machine"]
    (h,) = alloc.capacity().hosts
    assert h.gpus == [] and h.cpu_cores.total == len(PsutilProvider().cores()[0]) and h.ram_mb.total > 0
    assert h.labels["zone"] == "local"
    assert "NVML unavailable" in caplog.text
