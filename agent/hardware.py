"""Hardware facts the agent reads from its host and reports in its birth message."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from agent.protocol import HardwareFacts

# CPU features that matter for choosing a model variant (int8 dot products, wide SIMD).
NOTABLE_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
    "f16c",
    "fma",
    "neon",
    "asimd",
    "asimddp",
    "asimdhp",
    "sve",
)


def _cpuinfo(root: Path) -> tuple[str, list[str]]:
    try:
        text = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "", []
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return model, [f for f in NOTABLE_FLAGS if f in flags]


def _memory_mb(root: Path) -> int:
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def read_hardware(root: Path = Path("/")) -> HardwareFacts:
    """Read what can be read; anything unreadable is left empty rather than failing."""
    model, flags = _cpuinfo(root)
    return HardwareFacts(
        arch=platform.machine() or "unknown",
        cpu_model=model,
        cpu_flags=flags,
        cores=os.cpu_count() or 1,
        memory_mb=_memory_mb(root),
        os=f"{platform.system()} {platform.release()}".strip(),
        python=platform.python_version(),
    )
