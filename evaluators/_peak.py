"""Instruction-rate probe: hand-assembled x86-64 loops run from executable memory measure the
core clock and the per-core throughput of each vector / AMX ISA on this CPU."""

from __future__ import annotations

import ctypes
import mmap
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

# Each loop is called as fn(rdi=iterations, rsi=argument) and returns when rdi reaches zero.
_DEC_RDI = bytes.fromhex("48ffcf")


def _loop(setup: bytes, body: bytes, tail: bytes) -> bytes:
    """``setup``; repeat ``body`` (dec rdi; jnz back); ``tail``; ret."""
    back = -(len(body) + len(_DEC_RDI) + 2)
    if back >= -128:
        jump = bytes([0x75, back & 0xFF])  # jnz rel8
    else:
        back -= 4  # jnz rel32 is 6 bytes, not 2
        jump = bytes.fromhex("0f85") + (back & 0xFFFFFFFF).to_bytes(4, "little")
    return setup + body + _DEC_RDI + jump + tail + b"\xc3"


def _vex3(r: int, vvvv: int, rm: int, pp: int, map_: int, opcode: int, wide: bool) -> bytes:
    """A VEX-encoded ``op reg(r), reg(vvvv), reg(rm)`` on xmm/ymm registers 0-15."""
    byte1 = (r < 8) << 7 | 1 << 6 | (rm < 8) << 5 | map_
    byte2 = (~vvvv & 0xF) << 3 | wide << 2 | pp
    return bytes([0xC4, byte1, byte2, opcode, 0xC0 | (r & 7) << 3 | (rm & 7)])


# 100 dependent `add rax, rcx` per iteration: one cycle each on every x86 core.
_ADD_CHAIN = _loop(bytes.fromhex("4831c048c7c101000000"), bytes.fromhex("4801c8") * 100, b"")
_VZEROUPPER = bytes.fromhex("c5f877")

# 14 independent `vfmadd231ps ymm_i, ymm14, ymm15` on zeroed registers (no denormal assists).
_AVX2_FMA = _loop(b"".join(_vex3(i, i, i, 1, 1, 0xEF, True) for i in range(16)),  # vpxor
                  b"".join(_vex3(i, 14, 15, 1, 2, 0xB8, True) for i in range(14)), _VZEROUPPER)

# vpxord zmm0-15, zmm30, zmm31 (zero inputs: no denormal assists).
_ZERO_ZMM = bytes.fromhex(
    "62f17d48efc062f17548efc962f16d48efd262f16548efdb62f15d48efe462f15548efed62f14d48eff6"
    "62f14548efff62513d48efc062513548efc962512d48efd262512548efdb62511d48efe462511548efed"
    "62510d48eff662510548efff62010d40eff662010540efff"
)


def _zmm_loop(opcode: int, pp: int) -> bytes:
    """16 independent `op zmm_i, zmm30, zmm31` per iteration (EVEX, 0F38 map)."""
    body = b"".join(bytes([0x62, 0x92 if r < 8 else 0x12, pp, 0x40, opcode, 0xC7 | (r & 7) << 3])
                    for r in range(16))
    return _loop(_ZERO_ZMM, body, _VZEROUPPER)


def _amx_loop(vex2: int, opcode: int) -> bytes:
    """ldtilecfg [rsi]; tilezero tmm0-5; 4 independent `op tmm0-3, tmm4, tmm5`; tilerelease."""
    zero = b"".join(bytes([0xC4, 0xE2, 0x7B, 0x49, 0xC0 | t << 3]) for t in range(6))
    body = b"".join(bytes([0xC4, 0xE2, vex2, opcode, 0xC4 | t << 3]) for t in range(4))
    return _loop(bytes.fromhex("c4e2784906") + zero, body, bytes.fromhex("c4e27849c0"))


@dataclass(frozen=True)
class _Probe:
    code: bytes
    ops_per_iteration: int
    flags: tuple[str, ...]  # the /proc/cpuinfo flags the loop needs
    instruction: str


PROBES: dict[str, _Probe] = {
    "avx2": _Probe(_AVX2_FMA, 14 * 8 * 2, ("avx2", "fma"), "VFMADD231PS ymm"),
    "avx512": _Probe(_zmm_loop(0xB8, 0x0D), 16 * 16 * 2, ("avx512f",), "VFMADD231PS zmm"),
    "avx512_vnni": _Probe(_zmm_loop(0x50, 0x0D), 16 * 64 * 2, ("avx512_vnni",),
                          "VPDPBUSD zmm"),
    "avx512_bf16": _Probe(_zmm_loop(0x52, 0x0E), 16 * 32 * 2, ("avx512_bf16",),
                          "VDPBF16PS zmm"),
    "amx_bf16": _Probe(_amx_loop(0x52, 0x5C), 4 * 16 * 16 * 32 * 2, ("amx_bf16",),
                       "TDPBF16PS"),
    "amx_int8": _Probe(_amx_loop(0x53, 0x5E), 4 * 16 * 16 * 64 * 2, ("amx_int8",),
                       "TDPBSSD"),
}


@dataclass(frozen=True)
class Rates:
    """What the probe measured on one core: the highest clock seen (None if the probe could
    not run), ops per cycle of each ISA, and for every ISA without a figure the reason."""

    clock_ghz: float | None
    per_cycle: Mapping[str, float] = field(default_factory=dict)
    missing: Mapping[str, str] = field(default_factory=dict)

    @property
    def gops(self) -> dict[str, float]:
        """Per-core GOP/s of each measured ISA at ``clock_ghz``."""
        return {isa: ops * (self.clock_ghz or 0.0) for isa, ops in self.per_cycle.items()}


def _native(code: bytes) -> Callable[..., int]:
    """Map ``code`` executable; the returned function keeps the mapping alive. Raises
    OSError (or ValueError) where executable memory is refused."""
    page = mmap.mmap(-1, len(code), prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    proto = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p)
    fn = proto(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    fn.page = page
    return fn


class _Timed:
    """A native loop run for about ``seconds`` per call; ``rate()`` is its ops/s."""

    def __init__(self, code: bytes, ops_per_iteration: int, arg: int | None, seconds: float):
        self.fn, self.ops, self.arg = _native(code), ops_per_iteration, arg
        self.iterations = 1000
        elapsed = self._run()
        self.iterations = max(1000, int(1000 * seconds / max(elapsed, 1e-9)))

    def _run(self) -> float:
        t0 = time.thread_time()  # CPU time: a run preempted by another process is not slower
        self.fn(self.iterations, self.arg)
        return time.thread_time() - t0

    def rate(self) -> float:
        return self.iterations * self.ops / max(self._run(), 1e-12)


def _amx_permitted() -> bool:
    """Ask Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA)."""
    try:
        return ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18) == 0
    except (OSError, AttributeError):
        return False


def _tile_config() -> ctypes.Array:
    config = (ctypes.c_uint8 * 64)()
    config[0] = 1  # palette 1; six 16-row x 64-byte tiles
    for t in range(6):
        config[16 + 2 * t], config[48 + t] = 64, 16
    return config


def measure_rates(flags: Iterable[str], *, seconds: float = 0.02,
                  rounds: int = 7) -> Rates:
    """Measure ops per cycle of each ISA in ``flags`` (cpuinfo flags; AMX also needs the
    kernel's permission) on the calling core, and the clock (dependent scalar adds, 1/cycle).

    Runs are timed in thread CPU time, so time lost to other processes does not count. Each
    ISA loop runs ``rounds`` times, each right after a run of the clock loop, and its ops per
    cycle is the median of those paired ratios, so a changing clock cancels out;
    ``clock_ghz`` is the highest clock seen. Never raises for a machine that cannot run the
    probe (not x86-64, executable memory refused): the reason is returned for every ISA.
    """
    flags = frozenset(flags)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        reason = f"the probe is x86-64 code; this is {platform.machine()}"
        return Rates(None, {}, dict.fromkeys(PROBES, reason))
    try:
        clock = _Timed(_ADD_CHAIN, 100, None, seconds)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        reason = f"executable memory refused ({type(exc).__name__}: {exc})"
        return Rates(None, {}, dict.fromkeys(PROBES, reason))
    clocks = [clock.rate() for _ in range(3)]
    per_cycle: dict[str, float] = {}
    missing: dict[str, str] = {}
    amx_ok = "amx_tile" in flags and _amx_permitted()
    config = _tile_config()
    for isa, probe in PROBES.items():
        absent = [flag for flag in probe.flags if flag not in flags]
        if absent:
            missing[isa] = f"no {' / '.join(absent)} in the cpuinfo flags"
            continue
        if isa.startswith("amx") and not amx_ok:
            missing[isa] = "Linux refused the AMX tile state (arch_prctl)"
            continue
        arg = ctypes.addressof(config) if isa.startswith("amx") else None
        loop = _Timed(probe.code, probe.ops_per_iteration, arg, seconds)
        ratios = []
        for _ in range(rounds):
            clocks.append(clock.rate())
            ratios.append(loop.rate() / clocks[-1])
        per_cycle[isa] = statistics.median(ratios)
    return Rates(max(clocks) / 1e9, per_cycle, missing)
