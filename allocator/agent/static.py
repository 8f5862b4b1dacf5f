"""Static inventory: simulated hosts from a JSON or YAML file, or the OpenB node list (CSV).

This is the one way NVML is simulated (tests, benchmarks, demos): one agent process can serve a
whole fleet, e.g. the 1,213 OpenB hosts. The file is read again when it changes, so a test or an
operator can change capacity, unmanaged GPU memory or the simulated GPU processes while the
agent runs. File format (YAML shown; JSON is the same structure)::

    defaults:                     # optional, merged into every host
      labels: {cluster: sim, zone: z1}
    hosts:                        # or the file is just this list
      - id: sim-0
        labels: {zone: z2}
        cpu_cores: 16             # a count (ids 0..15) or a list of core ids
        ram_mb: 64Gi              # MiB, or a size string
        gpus:
          - index: 0
            uuid: GPU-0f1e…       # default "<host>-gpu<index>"; letters, digits, . _ : @ / -
            model: A100
            memory_mb: 40Gi
            used_mb: 1Gi          # in use by nothing listed below (other tenants, the driver)
            utilization_pct: 35
            processes:            # what NVML would list: pid and its memory on this GPU
              - {pid: 4242, used_mb: 6Gi}
            mig_devices:          # when set, the GPU is in MIG mode and these are scheduled
              - {uuid: MIG-…, profile: 3g.20gb, memory_mb: 20Gi, processes: []}

A malformed file raises ``InvalidInventory`` naming the entry, e.g. ``hosts[3].gpus[0].memory_mb``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from datetime import date
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import InvalidRequest
from ..models import HostSpec, check_gpu_uuid, parse
from ..units import parse_memory_mb
from .inventory import MIG_INDEX_BASE, GpuProcess, GpuUnit, HostInventory, InvalidInventory

log = logging.getLogger(__name__)

GIB = 1024
#: Per-GPU memory assumed for the OpenB models, which the trace does not state (see
#: ../shared/data/openb/README.md); any other model gets ``OPENB_DEFAULT_GPU_MEMORY_MB``.
OPENB_GPU_MEMORY_MB = {"P100": 16 * GIB, "T4": 16 * GIB, "V100M16": 16 * GIB, "V100M32": 32 * GIB,
                       "A10": 24 * GIB, "G2": 32 * GIB, "G3": 32 * GIB}
OPENB_DEFAULT_GPU_MEMORY_MB = 16 * GIB
OPENB_COLUMNS = ("sn", "cpu_milli", "memory_mib", "gpu", "model")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _mem(v: object, info: Any) -> object:
    return None if v is None else parse_memory_mb(v, info.field_name)


def _no_bool(v: object) -> object:
    """YAML reads ``yes``/``on`` as true, which pydantic would take as the number 1 (a core count,
    a GPU index): refused, as a registration refuses it."""
    if isinstance(v, bool) or (isinstance(v, list) and any(isinstance(x, bool) for x in v)):
        raise ValueError(f"expected a number, got {v!r}")
    return v


def _uuid(v: object) -> object:
    return check_gpu_uuid(v)


class _Proc(_Strict):
    pid: int = Field(ge=1)
    used_mb: int | None = None
    check_memory = field_validator("used_mb", mode="before")(_mem)
    check_numbers = field_validator("pid", mode="before")(_no_bool)


class _Mig(_Strict):
    uuid: str | None = None
    profile: str = "mig"
    memory_mb: int = Field(gt=0)
    used_mb: int = 0
    utilization_pct: float | None = Field(None, ge=0, le=100)
    processes: list[_Proc] = Field(default_factory=list)
    check_memory = field_validator("memory_mb", "used_mb", mode="before")(_mem)
    check_numbers = field_validator("utilization_pct", mode="before")(_no_bool)
    check_uuid = field_validator("uuid", mode="before")(_uuid)


class _Gpu(_Strict):
    index: int = Field(ge=0, lt=MIG_INDEX_BASE)
    uuid: str | None = None
    model: str = "GPU"
    memory_mb: int = Field(gt=0)
    used_mb: int = Field(0, ge=0)
    utilization_pct: float | None = Field(None, ge=0, le=100)
    processes: list[_Proc] = Field(default_factory=list)
    mig_devices: list[_Mig] = Field(default_factory=list)
    check_memory = field_validator("memory_mb", "used_mb", mode="before")(_mem)
    check_numbers = field_validator("index", "utilization_pct", mode="before")(_no_bool)
    check_uuid = field_validator("uuid", mode="before")(_uuid)

    @model_validator(mode="after")
    def _mig_fits(self) -> _Gpu:
        # MIG instances are slices of their GPU: together they cannot hold more than it has.
        total = sum(m.memory_mb for m in self.mig_devices)
        if total > self.memory_mb:
            raise ValueError(f"its MIG devices hold {total} MiB together, more than the GPU's {self.memory_mb} MiB")
        return self


def _labels(v: object) -> object:
    """Labels as a registration takes them: text names and text values. YAML reads ``rack: 12``,
    ``cuda: 12.10``, ``rack: 012``, ``ib: yes`` or ``since: 2026-01-05`` as a number, a boolean or
    a date, and turning those back into text would not give what the author wrote (``12.1``,
    ``10``, ``true``, Python's rendering of a date or time): they are refused
    with a hint to quote them, as Kubernetes does."""
    if not isinstance(v, dict):
        return v
    for k, x in v.items():
        if not isinstance(k, str):
            raise ValueError(f"label name {k!r} must be text; quote it")
        if not isinstance(x, str):
            what = "null" if x is None else type(x).__name__
            hint = "; quote it" if isinstance(x, (bool, int, float, date)) else ""
            raise ValueError(f"label {k!r}: a label value must be text, got {what} {x!r}{hint}")
    return v


class _Host(_Strict):
    id: str
    labels: dict[str, str] = Field(default_factory=dict)
    cpu_cores: int | list[int]
    ram_mb: int
    gpus: list[_Gpu] = Field(default_factory=list)
    check_memory = field_validator("ram_mb", mode="before")(_mem)
    check_numbers = field_validator("cpu_cores", mode="before")(_no_bool)
    check_labels = field_validator("labels", mode="before")(_labels)


class _Defaults(_Strict):
    labels: dict[str, str] = Field(default_factory=dict)
    check_labels = field_validator("labels", mode="before")(_labels)


class _File(_Strict):
    defaults: _Defaults = Field(default_factory=_Defaults)
    hosts: list[_Host]


def _field_path(dotted: str) -> str:
    """'hosts.3.gpus.0.memory_mb' -> 'hosts[3].gpus[0].memory_mb' (how people read it)."""
    out = ""
    for part in dotted.split("."):
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _units(host_id: str, g: _Gpu) -> list[GpuUnit]:
    def used(base: int, procs: list[_Proc]) -> int:
        return base + sum(p.used_mb or 0 for p in procs)

    def plist(procs: list[_Proc]) -> list[GpuProcess]:
        return [GpuProcess(p.pid, p.used_mb) for p in procs]

    uuid = g.uuid or f"{host_id}-gpu{g.index}"
    if not g.mig_devices:
        return [GpuUnit(index=g.index, uuid=uuid, model=g.model, memory_mb=g.memory_mb,
                        used_mb=used(g.used_mb, g.processes), processes=plist(g.processes),
                        utilization_pct=g.utilization_pct)]
    return [
        GpuUnit(index=(g.index + 1) * MIG_INDEX_BASE + p, uuid=m.uuid or f"{uuid}-mig{p}",
                model=f"{g.model} MIG {m.profile}", memory_mb=m.memory_mb, used_mb=used(m.used_mb, m.processes),
                processes=plist(m.processes), utilization_pct=m.utilization_pct, parent_index=g.index,
                parent_uuid=uuid, mig_profile=m.profile)
        for p, m in enumerate(g.mig_devices)
    ]


def parse_inventory(data: object, source: str = "inventory") -> list[HostInventory]:
    """Validates a static inventory document (already decoded) into host inventories."""
    if isinstance(data, list):
        data = {"hosts": data}
    if not isinstance(data, dict):
        raise InvalidInventory(source, "hosts", f"expected a mapping with 'hosts' or a list of hosts, got {type(data).__name__}")
    try:
        doc = parse(_File, data)
    except InvalidRequest as exc:
        raise InvalidInventory(source, _field_path(exc.field), exc.reason) from None
    out: list[HostInventory] = []
    seen: set[str] = set()
    for i, h in enumerate(doc.hosts):
        labels = {**doc.defaults.labels, **h.labels}
        units = [u for g in h.gpus for u in _units(h.id, g)]
        spec = {"id": h.id, "labels": labels, "cpu_cores": h.cpu_cores, "ram_mb": h.ram_mb,
                "gpus": [{"index": u.index, "uuid": u.uuid, "model": u.model, "memory_mb": u.memory_mb} for u in units]}
        try:
            checked = parse(HostSpec, spec)  # the ledger's own rules: id syntax, distinct ids and uuids
        except InvalidRequest as exc:
            raise InvalidInventory(source, f"hosts[{i}].{_field_path(exc.field)}", exc.reason) from None
        if h.id in seen:
            raise InvalidInventory(source, f"hosts[{i}].id", f"duplicate host id {h.id!r}")
        seen.add(h.id)
        for u in units:
            if u.used_mb > u.memory_mb:
                raise InvalidInventory(source, f"hosts[{i}].gpus", f"GPU {u.uuid} uses {u.used_mb} MiB of {u.memory_mb} MiB")
        out.append(HostInventory(h.id, list(checked.cpu_cores), h.ram_mb, units, labels, {"provider": "static", "source": source}))
    return out


def load_openb_csv(path: Path) -> list[HostInventory]:
    """The OpenB node list (``sn,cpu_milli,memory_mib,gpu,model``) as hosts.

    cores = cpu_milli // 1000, RAM = memory_mib, ``gpu`` GPUs of the row's model with the memory
    of ``OPENB_GPU_MEMORY_MB``; labels cluster=openb and the GPU model.
    """
    source = str(path)
    with path.open(newline="", encoding="utf-8") as fh:
        return _openb_rows(csv.DictReader(fh), source)


def _check_openb_row(source: str, line: int, sn: str, ngpu: int, cpu_milli: int, ram: int, model: str) -> None:
    """A CSV row is held to what a YAML host is (``HostSpec``'s bounds), before its core and GPU
    lists are built: a count of 10^12 would exhaust memory, a negative one registered 0."""
    from ..keys import MAX_GPUS_PER_HOST

    where = f"line {line}"
    for name, v in (("gpu", ngpu), ("cpu_milli", cpu_milli), ("memory_mib", ram)):
        if v < 0:
            raise InvalidInventory(source, where, f"{name}: must not be negative, got {v}")
    if ngpu > MAX_GPUS_PER_HOST:
        raise InvalidInventory(source, where, f"gpu: at most {MAX_GPUS_PER_HOST} GPUs per host, got {ngpu}")
    try:
        parse(HostSpec, {"id": sn, "cpu_cores": cpu_milli // 1000, "ram_mb": ram,
                         "gpus": [{"index": 0, "model": model, "memory_mb": 1}] if ngpu else []})
    except InvalidRequest as exc:
        raise InvalidInventory(source, where, str(exc)) from None


def _openb_rows(reader: csv.DictReader, source: str) -> list[HostInventory]:
    out: list[HostInventory] = []
    missing = [c for c in OPENB_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise InvalidInventory(source, "header", f"missing column(s) {', '.join(missing)}; expected {','.join(OPENB_COLUMNS)}")
    first_seen: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        if any(row.get(c) is None for c in OPENB_COLUMNS):
            raise InvalidInventory(source, f"line {line}", f"fewer fields than the header's {len(OPENB_COLUMNS)}")
        try:
            ngpu, cpu_milli, ram = int(row["gpu"] or 0), int(row["cpu_milli"]), int(row["memory_mib"])
        except ValueError as exc:
            raise InvalidInventory(source, f"line {line}", f"not a number: {exc}") from None
        sn, model = row["sn"].strip(), (row["model"] or "").strip() or "GPU"
        _check_openb_row(source, line, sn, ngpu, cpu_milli, ram, model)
        if sn in first_seen:
            raise InvalidInventory(source, f"line {line}", f"host {sn!r} again (first at line {first_seen[sn]})")
        first_seen[sn] = line
        mem = OPENB_GPU_MEMORY_MB.get(model, OPENB_DEFAULT_GPU_MEMORY_MB)
        gpus = [GpuUnit(index=i, uuid=f"{sn}-gpu{i}", model=model, memory_mb=mem) for i in range(ngpu)]
        labels = {"cluster": "openb"}
        out.append(HostInventory(sn, list(range(cpu_milli // 1000)), ram, gpus, labels,
                                 {"provider": "static", "source": source}))
    return out


def load_inventory_file(path: str | os.PathLike[str]) -> list[HostInventory]:
    """Reads a ``.json``, ``.yaml``/``.yml`` or OpenB ``.csv`` inventory; ``InvalidInventory`` if malformed."""
    p = Path(path)
    source = str(p)
    if not p.is_file():
        raise InvalidInventory(source, "path", "no such file")
    try:
        if p.suffix.lower() == ".csv":
            return load_openb_csv(p)
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInventory(source, "file", f"not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise InvalidInventory(source, f"line {exc.lineno} column {exc.colno}", f"not valid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "document"
        raise InvalidInventory(source, where, f"not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    return parse_inventory(data, source)


class StaticProvider:
    """Hosts from an inventory file, re-read whenever the file changes (mtime or size).

    A file that becomes malformed while the agent runs is reported (error log) and the last good
    inventory is kept, so a bad edit cannot make a fleet vanish; at start-up it raises.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._hosts = load_inventory_file(self.path)
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def hosts(self) -> list[HostInventory]:
        stamp = self._stat()
        if stamp != self._stamp:
            try:
                self._hosts = load_inventory_file(self.path)
            except InvalidInventory as exc:
                log.error("inventory file changed but is invalid, keeping the last good one: %s", exc)
            except Exception as exc:  # unreadable for now (permissions, EMFILE, EIO): read it again next round
                log.error("inventory file changed but could not be read (%s: %s), keeping the last good one",
                          type(exc).__name__, exc)
                return self._hosts
            self._stamp = stamp
        return self._hosts

    def close(self) -> None:
        pass
