"""Host registration, capacity updates that keep grants intact, drain and removal."""

import json

import pytest

from allocator import HostBusy, HostNotFound, InsufficientResources, InvalidRequest
from allocator.invariants import check

from .conftest import ledger_dump


def test_capacity_update_keeps_existing_grants(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    x = alloc_any.allocate({"gpu_memory_mb": "10Gi", "cpu_cores": 2, "ram_mb": "8Gi"})
    alloc_any.register_host(id="h1", cpu_cores=8, ram_mb="32Gi",
                            gpus=[{"index": 0, "memory_mb": "16Gi", "used_mb": "2Gi"}, {"index": 1, "memory_mb": "16Gi"}])
    h = alloc_any.capacity().hosts[0]
    assert h.gpus[0].memory.allocated == 10240 and h.gpus[0].memory.available == 4096
    assert h.gpus[0].memory.unmanaged == 2048
    assert h.cpu_cores.available == 6 and h.ram_mb.available == 24576
    assert alloc_any.get(x.allocation_id).state == "active"
    # The granted cores stay taken: new exclusive grants get other ids.
    assert alloc_any.allocate({"cpu_cores": 2}).cpu_cores == [2, 3]


def test_shrinking_below_what_is_granted_never_goes_negative(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    x = alloc_any.allocate({"gpu_memory_mb": "12Gi", "cpu_cores": 4, "ram_mb": "16Gi"})
    alloc_any.register_host(id="h1", cpu_cores=2, ram_mb="8Gi", gpus=[{"index": 0, "memory_mb": "8Gi"}])
    h = alloc_any.capacity().hosts[0]
    assert (h.gpus[0].memory.available, h.cpu_cores.available, h.ram_mb.available) == (0, 0, 0)
    alloc_any.release(x.allocation_id)
    h = alloc_any.capacity().hosts[0]
    assert (h.gpus[0].memory.available, h.cpu_cores.available, h.ram_mb.available) == (8192, 2, 8192)


def test_dropping_a_gpu_keeps_the_grant_on_the_other(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi",
                            gpus=[{"index": 0, "memory_mb": "16Gi"}, {"index": 1, "memory_mb": "16Gi"}])
    x = alloc_any.allocate({"gpus": 2, "gpu_memory_mb": "4Gi"})
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    assert alloc_any.capacity().hosts[0].gpus[0].memory.allocated == 4096
    alloc_any.release(x.allocation_id)
    assert alloc_any.capacity().gpu_memory_mb.allocated == 0
    assert alloc_any.redis.zcard(alloc_any.keys.gpu_idx) == 1


def test_drained_host_takes_no_new_work_until_resumed(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi")
    x = alloc_any.allocate({"cpu_cores": 1})
    alloc_any.drain_host("h1")
    with pytest.raises(InsufficientResources):
        alloc_any.allocate({"cpu_cores": 1})
    assert alloc_any.get(x.allocation_id).state == "active"
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi")  # re-registering keeps the drain
    assert alloc_any.capacity().hosts[0].state == "draining"
    alloc_any.resume_host("h1")
    assert alloc_any.allocate({"cpu_cores": 1}).host_id == "h1"


def test_removing_a_busy_host_needs_force(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi")
    x = alloc_any.allocate({"cpu_cores": 1})
    with pytest.raises(HostBusy, match="still holds 1 active allocation"):
        alloc_any.remove_host("h1")
    assert alloc_any.remove_host("h1", force=True) == [x.allocation_id]
    assert alloc_any.get(x.allocation_id).release_reason == "host_removed"
    assert alloc_any.capacity().host_count == 0


def test_unknown_host_operations_are_not_found(alloc_any):
    with pytest.raises(HostNotFound):
        alloc_any.drain_host("ghost")
    with pytest.raises(HostNotFound):
        alloc_any.remove_host("ghost")


def test_a_host_with_more_gpus_than_the_indexes_can_order_is_refused(alloc_any):
    with pytest.raises(InvalidRequest) as exc:
        alloc_any.register_host(id="h1", cpu_cores=4, gpus=[{"index": i, "memory_mb": 1024} for i in range(1025)])
    assert exc.value.field == "gpus" and "at most 1024 GPUs per host, got 1025" in str(exc.value)
    assert alloc_any.redis.zcard(alloc_any.keys.hosts) == 0


@pytest.mark.parametrize(
    ("fields", "field", "reason_part"),
    [
        ({"worker_slots": 10**30}, "worker_slots", "less than or equal to 1048576"),
        ({"cpu_cores": ["1000000000000000", "1000000000000001"]}, "cpu_cores", "between 0 and 1048575"),
        ({"cpu_cores": [2.0, 3e6]}, "cpu_cores", "between 0 and 1048575"),
        ({"cpu_cores": [True, False]}, "cpu_cores", "whole number"),
        ({"cpu_cores": [0.5]}, "cpu_cores", "whole number"),
        ({"gpus": [{"index": True, "memory_mb": 1024}]}, "gpus.0.index", "whole number"),
        ({"reserve_gpus": True}, "reserve_gpus", "whole number"),
        ({"worker_slots": True}, "worker_slots", "whole number"),
        ({"service_ports": [float("inf"), 9000]}, "service_ports", "port numbers"),
        ({"service_ports": [True, 5]}, "service_ports", "port numbers"),
        ({"service_ports": [9000.7, 9001.9]}, "service_ports", "port numbers"),
        ({"labels": {"cluster": ["a", "b"]}}, "labels.cluster", "text or a number"),
        ({"labels": {"zone": None}}, "labels.zone", "text or a number"),
        ({"labels": {1: "a"}}, "labels", "label names must be strings"),
        ({"labels": {"k=v": "w"}}, "labels", "without '='"),
        ({"labels": {"": "w"}}, "labels", "non-empty"),
        ({"gpus": [{"index": 0, "uuid": "", "memory_mb": 1024}]}, "gpus.0.uuid", "not a GPU uuid"),
        ({"gpus": [{"index": 0, "uuid": "   ", "memory_mb": 1024}]}, "gpus.0.uuid", "not a GPU uuid"),
        ({"gpus": [{"index": 0, "uuid": "GPU-aaaa,GPU-bbbb", "memory_mb": 1024}]}, "gpus.0.uuid", "not a GPU uuid"),
        ({"gpus": [{"index": 0, "uuid": "GPU-aaaa GPU-bbbb", "memory_mb": 1024}]}, "gpus.0.uuid", "not a GPU uuid"),
        ({"gpus": [{"index": 0, "uuid": "-GPU-aaaa", "memory_mb": 1024}]}, "gpus.0.uuid", "not a GPU uuid"),
        ({"gpus": [{"index": 0, "uuid": "GPU-" + "a" * 253, "memory_mb": 1024}]}, "gpus.0.uuid", "not a GPU uuid"),
    ],
)
def test_a_bad_inventory_value_is_refused_naming_the_field_and_changes_nothing(alloc, fields, field, reason_part):
    alloc.register_host(id="h1", cpu_cores=2, ram_mb=1024)
    before = ledger_dump(alloc)
    with pytest.raises(InvalidRequest) as exc:
        alloc.register_host(id="h2", ram_mb=1024, **fields)
    assert exc.value.field == field and reason_part in exc.value.reason
    assert ledger_dump(alloc) == before


def test_inventory_numbers_written_as_text_or_whole_floats_are_read_as_ints(alloc):
    alloc.register_host(id="h1", cpu_cores=["0", 1.0], ram_mb=1024, service_ports=["9000", 9001.0],
                        labels={"gpus_per_node": 8}, worker_slots=2.0)
    host = alloc.capacity().hosts[0]
    assert (host.labels["gpus_per_node"], host.cpu_cores.total, host.worker_slots.total) == ("8", 2, 2)
    assert alloc.allocate({"cpu_cores": 2, "ram_mb": 512}).cpu_cores == [0, 1]


def test_a_gpu_held_whole_stays_unshareable_when_other_processes_free_memory_on_it(alloc_any):
    gpu = {"index": 0, "uuid": "U0", "memory_mb": "16Gi"}
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{**gpu, "used_mb": "1Gi"}])
    x = alloc_any.allocate({"gpus": 1, "cpu_cores": 1})  # whole: the 15 GiB left free
    assert x.gpus[0].memory_mb == 15360
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[gpu])  # the other process ended
    # The whole grant takes the memory freed: nothing to share, and its job may use all 16 GiB.
    assert alloc_any.get(x.allocation_id).gpus[0].memory_mb == 16384
    assert alloc_any.would_fit({"gpus": 1, "gpu_memory_mb": "1Gi"}) is None
    assert check(alloc_any.snapshot()) == []
    alloc_any.release(x.allocation_id)
    assert alloc_any.capacity().hosts[0].gpus[0].memory.available == 16384


def test_a_gpu_held_whole_is_overcommitted_not_shrunk_when_another_process_takes_memory(alloc_any):
    gpu = {"index": 0, "uuid": "U0", "memory_mb": "16Gi"}
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[gpu])
    x = alloc_any.allocate({"gpus": 1, "cpu_cores": 1})
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{**gpu, "used_mb": "2Gi"}])
    assert alloc_any.get(x.allocation_id).gpus[0].memory_mb == 16384
    assert alloc_any.redis.hget(alloc_any.keys.host("h1"), "overcommitted") == "1"


def test_a_host_model_changed_after_it_was_built_is_checked_again(alloc):
    from allocator.models import HostSpec, parse

    spec = parse(HostSpec, {"id": "h1", "cpu_cores": 2, "ram_mb": "4Gi", "gpus": [{"index": 0, "memory_mb": 1000}]})
    spec.reserve_gpus = 3
    with pytest.raises(InvalidRequest) as exc:
        alloc.register_host(spec)
    assert exc.value.field == "reserve_gpus"
    assert alloc.capacity().host_count == 0


def test_a_label_added_to_a_host_models_default_labels_is_kept_when_it_is_checked_again(alloc):
    from allocator.models import HostSpec

    spec = HostSpec(id="h1", cpu_cores=2, ram_mb=1024)
    spec.labels["zone"] = "z1"
    alloc.register_host(spec)
    assert alloc.capacity().hosts[0].labels == {"cluster": "default", "zone": "z1"}


@pytest.mark.parametrize("uuid", [
    "GPU-5f2c1a3e-8b7d-4c2e-9f1a-0123456789ab",  # NVML
    "MIG-GPU-5f2c1a3e-8b7d-4c2e-9f1a-0123456789ab/1/0",  # MIG before CUDA 11.1's driver
    "MIG-5f2c1a3e-8b7d-4c2e-9f1a-0123456789ab",  # MIG since
])
def test_nvml_gpu_and_mig_uuids_are_taken(alloc, uuid):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb=1024, gpus=[{"index": 0, "uuid": uuid, "memory_mb": 1024}])
    assert alloc.capacity().hosts[0].gpus[0].uuid == uuid


def test_the_default_gpu_uuid_of_a_host_with_the_longest_id_is_taken_when_checked_again(alloc):
    from allocator.models import HostSpec, parse

    spec = parse(HostSpec, {"id": "h@" + "x" * 126, "cpu_cores": 1, "gpus": [{"index": 1048575, "memory_mb": 1024}]})
    alloc.register_host(spec)
    assert alloc.capacity().hosts[0].gpus[0].uuid == "h@" + "x" * 126 + "-gpu1048575"


def test_a_grant_follows_its_gpu_when_an_update_moves_it(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 1, "memory_mb": "16Gi"}])
    x = alloc_any.allocate({"gpus": 1, "cpu_cores": 1})  # GPU index 1, the host's position 0
    # GPU 0 joins ahead of it: the granted GPU is now at position 1.
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi",
                            gpus=[{"index": 0, "memory_mb": "16Gi"}, {"index": 1, "memory_mb": "16Gi"}])
    assert [g["pos"] for g in json.loads(alloc_any.redis.hget(alloc_any.keys.alloc(x.allocation_id), "gpus"))] == [1]
    alloc_any.release(x.allocation_id)
    assert check(alloc_any.snapshot()) == []
    assert [g.index for g in alloc_any.allocate({"gpus": 2, "cpu_cores": 1}).gpus] == [0, 1]


def test_a_grant_shows_its_gpus_new_index_when_an_update_renumbers_it(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 1, "uuid": "U1", "memory_mb": "16Gi"}])
    x = alloc_any.allocate({"gpus": 1, "cpu_cores": 1})
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "uuid": "U1", "memory_mb": "16Gi"}])
    assert [(g.index, g.uuid) for g in alloc_any.get(x.allocation_id).gpus] == [(0, "U1")]


def test_a_grant_recorded_at_its_gpus_old_position_is_released_where_the_gpu_is_now(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 1, "memory_mb": "16Gi"}])
    x = alloc_any.allocate({"gpus": 1, "cpu_cores": 1})
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi",
                            gpus=[{"index": 0, "memory_mb": "16Gi"}, {"index": 1, "memory_mb": "16Gi"}])
    # A record written before updates rewrote grants' positions still names position 0.
    key = alloc_any.keys.alloc(x.allocation_id)
    grants = json.loads(alloc_any.redis.hget(key, "gpus"))
    grants[0]["pos"] = 0
    alloc_any.redis.hset(key, "gpus", json.dumps(grants))
    alloc_any.release(x.allocation_id)
    assert check(alloc_any.snapshot()) == []
    assert [g.index for g in alloc_any.allocate({"gpus": 2, "cpu_cores": 1}).gpus] == [0, 1]


def test_dropping_a_gpu_a_grant_holds_marks_the_host_overcommitted(alloc):
    g0, g1 = {"index": 0, "uuid": "GPU-0", "memory_mb": 1000}, {"index": 1, "uuid": "GPU-1", "memory_mb": 1000}
    alloc.register_host(id="h1", cpu_cores=4, ram_mb=4000, gpus=[g0, g1])
    alloc.allocate({"gpus": 1, "gpu_memory_mb": 800}, strategy="first_fit")  # GPU-0
    alloc.allocate({"gpus": 1, "gpu_memory_mb": 800}, strategy="first_fit")  # GPU-1
    alloc.register_host(id="h1", cpu_cores=4, ram_mb=4000, gpus=[g0])  # GPU-1 is gone
    assert alloc.redis.hget(alloc.keys.host("h1"), "overcommitted") == "1"
    assert check(alloc.snapshot()) == []


def test_capacity_counts_memory_granted_on_a_gpu_the_host_no_longer_lists(alloc):
    g0, g1 = {"index": 0, "uuid": "GPU-0", "memory_mb": 1000}, {"index": 1, "uuid": "GPU-1", "memory_mb": 1000}
    alloc.register_host(id="h1", cpu_cores=4, ram_mb=4000, gpus=[g0, g1])
    alloc.allocate({"gpus": 1, "gpu_memory_mb": 800}, strategy="first_fit")  # GPU-0
    held = alloc.allocate({"gpus": 1, "gpu_memory_mb": 700}, strategy="first_fit")  # GPU-1
    alloc.register_host(id="h1", cpu_cores=4, ram_mb=4000, gpus=[g0])
    h = alloc.capacity().hosts[0]
    assert (h.gpu_memory_mb.total, h.gpu_memory_mb.allocated, h.gpu_memory_mb.available) == (1000, 1500, 200)
    assert alloc.capacity().gpu_memory_mb.allocated == 1500
    alloc.release(held.allocation_id)
    assert alloc.capacity().hosts[0].gpu_memory_mb.allocated == 800


def test_the_checker_reports_a_grant_on_an_unlisted_gpu_of_a_host_not_marked_overcommitted(alloc):
    g0, g1 = {"index": 0, "uuid": "GPU-0", "memory_mb": 1000}, {"index": 1, "uuid": "GPU-1", "memory_mb": 1000}
    alloc.register_host(id="h1", cpu_cores=4, ram_mb=4000, gpus=[g0, g1])
    alloc.allocate({"gpus": 2, "gpu_memory_mb": 500})
    alloc.register_host(id="h1", cpu_cores=4, ram_mb=4000, gpus=[g0])
    alloc.redis.hdel(alloc.keys.host("h1"), "overcommitted")  # as the registration before this fix left it
    assert check(alloc.snapshot()) == ["h1: grants hold GPUs the host does not list ['GPU-1'], and it is not marked overcommitted"]


def test_a_host_with_a_thousand_gpus_registers_whole_and_is_placed_on(alloc):
    gpus = [{"index": i, "uuid": f"GPU-{i:04d}", "memory_mb": 1024} for i in range(1000)]
    alloc.register_host(id="big", cpu_cores=8, ram_mb="64Gi", gpus=gpus)
    alloc.register_host(id="big", cpu_cores=8, ram_mb="64Gi", gpus=gpus[:999])  # an update, as large
    assert alloc.capacity().gpu_count == 999
    x = alloc.allocate({"gpus": 64})  # whole GPUs: the most one request takes
    assert x.host_id == "big" and len(x.gpus) == 64
    alloc.release(x.allocation_id)
    assert check(alloc.snapshot()) == []
    assert alloc.remove_host("big") == []
