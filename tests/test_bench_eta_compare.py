"""bench/eta_replay.py --compare: another version of the estimates, as a copy of the package
allocator/eta/ or of the single module allocator/eta.py it once was, runs on the same snapshot."""

import pickle
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from allocator import eta  # noqa: E402
from allocator.eta import read_snapshot  # noqa: E402
from bench import eta_replay  # noqa: E402

WHOLE = {"gpus": 1, "cpu_cores": 1}


def _snapshot(a, path: Path) -> Path:
    a.register_host(id="h1", cpu_cores=16, ram_mb="64Gi", gpus=[{"index": 0, "memory_mb": "16Gi", "model": "GPU"}])
    a.allocate(WHOLE, expected_duration=100)
    for _ in range(3):
        assert a.allocate(WHOLE, on_busy="queue", expected_duration=50).state == "pending"
    path.write_bytes(pickle.dumps(read_snapshot(a)))
    return path


def test_a_copy_of_the_package_loads_and_gives_the_same_estimates(alloc, tmp_path, capsys):
    copy = tmp_path / "eta_old"
    shutil.copytree(Path(eta.__file__).parent, copy)
    rc = eta_replay.main([str(_snapshot(alloc, tmp_path / "snap.pkl")), "--compare", str(copy)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 estimates, 0 differ" in out


def test_a_single_module_with_relative_imports_loads(tmp_path):
    # The estimates were one module, allocator/eta.py, importing ``.keys``: a copy of it must load
    # as a part of ``allocator`` for that import to resolve.
    old = tmp_path / "eta_single.py"
    old.write_text("from .keys import gpu_ord_score\n\nclass Simulation:\n    score = staticmethod(gpu_ord_score)\n")
    mod = eta_replay.load_module(str(old))
    assert mod.Simulation.score(1, 2) == eta.fleet.gpu_ord_score(1, 2)
