"""Per-core GOP/s ceiling of each ISA on this CPU: the measured instruction rate where the probe
runs, else a documented per-microarchitecture table at the clock, with its source stated."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..kernels import detect_target
from ._peak import PROBES, Rates, measure_rates

# Ops (2 per multiply-add) per cycle and core of the widest instruction of each ISA.
_FULL_WIDTH = {"avx2": 32, "avx512": 64, "avx512_bf16": 128, "avx512_vnni": 256}
_AMX = {"amx_bf16": 1024, "amx_int8": 2048}  # TDPBF16PS / TDPBSSD: one tile op per 16 cycles
OPS_PER_CYCLE: dict[str, dict[str, int]] = {
    # Zen 4 runs each 512-bit op double-pumped on 256-bit units: half Zen 5's rate; 256-bit
    # AVX2 FMAs (2 units x 8 lanes x 2) are not split, so they match Zen 5's.
    "zen4": {"avx2": 32, "avx512": 32, "avx512_bf16": 64, "avx512_vnni": 128},
    "zen5": dict(_FULL_WIDTH),  # two full-width 512-bit FMA / dot-product units
    "xeon_amx": {**_FULL_WIDTH, **_AMX},  # two 512-bit FMA units; AMX tiles for int8 / bf16
    "generic": {**_FULL_WIDTH, **_AMX},  # assumed: two full-width units, Intel's AMX rates
}
TABLE_NOTES = {
    "zen4": "AMD Zen 4: 512-bit ops double-pumped, half the per-cycle rate of Zen 5",
    "zen5": "AMD Zen 5: 512-bit ops at full width",
    "xeon_amx": "Intel Xeon with AMX: two 512-bit FMA units, AMX tile op per 16 cycles",
    "generic": "unknown microarchitecture: two full-width vector units assumed",
}


@dataclass(frozen=True)
class Microarch:
    """A microarchitecture of OPS_PER_CYCLE, and the cpuinfo fields it was read from."""

    name: str
    basis: str


def microarchitecture(cpuinfo: str) -> Microarch:
    """The microarchitecture of the first processor in a /proc/cpuinfo text.

    Zen 4 is AMD family 25 (0x19) with AVX-512 (Zen 3 shares the family, without AVX-512);
    Zen 5 is AMD family 26 (0x1a); an Intel CPU with ``amx_tile`` is a Xeon with AMX.
    Anything else is "generic".
    """
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block only
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    vendor = fields.get("vendor_id", "unknown vendor")
    family, model = _int(fields.get("cpu family")), _int(fields.get("model"))
    flags = set(fields.get("flags", "").split())
    basis = f"{vendor} family {family:#x} model {model:#x}" if family >= 0 else vendor
    if vendor == "AuthenticAMD" and family == 0x19 and "avx512f" in flags:
        return Microarch("zen4", basis)
    if vendor == "AuthenticAMD" and family == 0x1A:
        return Microarch("zen5", basis)
    if vendor == "GenuineIntel" and "amx_tile" in flags:
        return Microarch("xeon_amx", basis)
    return Microarch("generic", basis)


def _int(text: str | None) -> int:
    try:
        return int(text or "")
    except ValueError:
        return -1


@dataclass(frozen=True)
class Ceiling:
    """Clock, microarchitecture and measured per-core instruction rates of this CPU."""

    cpu: str
    cores: int
    uarch: Microarch
    clock_ghz: float
    clock_source: str
    probe_gops: Mapping[str, float] = field(default_factory=dict)
    probe_missing: Mapping[str, str] = field(default_factory=dict)

    def per_core(self, isa: str) -> tuple[float, str]:
        """(GOP/s of ``isa`` on one core, source): "measured", else "table:<uarch>"."""
        if isa in self.probe_gops:
            return self.probe_gops[isa], "measured"
        table = OPS_PER_CYCLE[self.uarch.name]
        if isa not in table:
            raise ValueError(f"No ceiling for ISA {isa!r} on {self.uarch.name}; "
                             f"it has: {sorted(table)}.")
        return self.clock_ghz * table[isa], f"table:{self.uarch.name}"

    def describe(self, isa: str, cores: int) -> str:
        """How the ceiling of ``isa`` on ``cores`` cores was obtained, in one line."""
        gops, source = self.per_core(isa)
        table = OPS_PER_CYCLE[self.uarch.name].get(isa)
        name = self.uarch.name
        stated = (f"table:{name} {table} op/cycle ({TABLE_NOTES[name]}; {self.uarch.basis})"
                  if table else f"no table:{name} entry ({self.uarch.basis})")
        clock = f"{self.clock_ghz:.2f} GHz ({self.clock_source})"
        if source == "measured":
            loop = PROBES[isa].instruction
            return (f"peak = {cores} core(s) x {gops:.0f} GOP/s measured ({loop} loop: "
                    f"{gops / self.clock_ghz:.1f} op/cycle x {clock}); {stated}")
        return (f"peak = {cores} core(s) x {clock} x {stated}; not measured: "
                f"{self.probe_missing.get(isa, 'no probe for this ISA')}")


def _cpuinfo() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/cpuinfo").read_text()
    return ""


_MAX_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")  # kHz


def _stated_clock(cpuinfo: str) -> tuple[float, str]:
    """The clock Linux states, in GHz, and where it was read."""
    with contextlib.suppress(OSError, ValueError):
        return int(_MAX_FREQ.read_text()) / 1e6, f"{_MAX_FREQ}, not measured"
    for line in cpuinfo.splitlines():
        if line.startswith("cpu MHz"):
            with contextlib.suppress(ValueError):
                return (float(line.partition(":")[2]) / 1e3,
                        "/proc/cpuinfo cpu MHz, not measured: may be below the boost clock")
    return 0.0, "unknown"


def build_ceiling(rates: Rates, cpuinfo: str) -> Ceiling:
    """The ceiling from probe ``rates`` and a cpuinfo text; without a measured clock, the
    clock Linux states stands in (cpufreq's maximum, else cpuinfo's "cpu MHz")."""
    target = detect_target()
    if rates.clock_ghz is not None:
        clock, source = rates.clock_ghz, "measured: highest rate of dependent scalar adds"
    else:
        clock, source = _stated_clock(cpuinfo)
    return Ceiling(target.cpu, target.cores, microarchitecture(cpuinfo), clock, source,
                   dict(rates.gops), dict(rates.missing))


@lru_cache(maxsize=1)
def measure_ceiling() -> Ceiling:
    """Probe this CPU once per process (about a second) and build its ceiling."""
    return build_ceiling(measure_rates(detect_target().flags), _cpuinfo())
