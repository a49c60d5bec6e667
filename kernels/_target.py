"""Hardware targets that latency is measured on, with their detected capabilities."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = ("cpu-x86",)


@dataclass(frozen=True)
class Target:
    """A named target and what its CPU offers (ISA flags relevant to compressed kernels)."""

    name: str
    cpu: str
    cores: int
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def capabilities(self) -> dict[str, bool]:
        return {
            "avx512": "avx512f" in self.flags,
            "vnni": "avx512_vnni" in self.flags or "avx_vnni" in self.flags,
            "bf16": "avx512_bf16" in self.flags,
            "amx": "amx_tile" in self.flags,
        }

    def to_dict(self) -> dict:
        return {"name": self.name, "cpu": self.cpu, "cores": self.cores, **self.capabilities}


def detect_target(name: str = "cpu-x86") -> Target:
    """Describe this machine as target ``name``; ValueError for an unknown or absent target."""
    if name not in TARGETS:
        raise ValueError(f"Unknown target {name!r}; valid targets: {list(TARGETS)}.")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise ValueError(f"Target {name!r} needs an x86-64 CPU; this is {platform.machine()}.")
    cpu, flags = platform.processor() or "unknown", frozenset()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                cpu = value.strip()
            elif key == "flags":
                flags = frozenset(value.split())
            if cpu != "unknown" and flags:
                break
    return Target(name=name, cpu=cpu, cores=os.cpu_count() or 1, flags=flags)
