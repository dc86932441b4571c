"""Compare what an agent reports about its host with its class's device profile.

Pure functions: the caller loads the profiles (``device_configs.schema.load_profiles``) and
passes the birth's facts and runtimes; the result says, field by field, where they disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from agent.protocol import HardwareFacts, ModelFormat
from device_configs.schema import CpuFeature, DeviceProfile

# Features that variants are built to rely on (int8 dot products, wide SIMD): without them a
# variant chosen for the class runs far slower than estimated, or not at all.
CRITICAL_FEATURES = frozenset({CpuFeature.ASIMDDP, CpuFeature.AVX512_VNNI, CpuFeature.AVX2})
MEMORY_TOLERANCE = 0.9  # firmware, GPU carve-outs and the kernel hide part of the RAM
# Other spellings of the profile architectures (macOS, Windows).
ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


class Severity(StrEnum):
    ERROR = "error"  # selection for this class would be wrong for the device
    WARNING = "warning"  # the device differs but variants for the class should still work


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One disagreement between profile and reported facts."""

    field: str
    expected: str
    reported: str
    severity: Severity
    message: str


def check_hardware(
    profile: DeviceProfile, facts: HardwareFacts, runtimes: Iterable[ModelFormat | str]
) -> list[Mismatch]:
    """Where the agent's facts and birth runtimes disagree with ``profile``; empty if nowhere."""
    found: list[Mismatch] = []
    cpu = profile.cpu
    arch = ARCH_ALIASES.get(facts.arch.lower(), facts.arch)
    same_arch = cpu.arch is None or arch == cpu.arch
    if cpu.arch is not None and not same_arch:
        found.append(
            Mismatch(
                "arch",
                cpu.arch.value,
                facts.arch,
                Severity.ERROR,
                f"{profile.name} is {cpu.arch.value} but the device reports {facts.arch}: "
                "variants and runtimes for the class will not run; fix device_class",
            )
        )
    if facts.cores < cpu.cores:
        found.append(
            Mismatch(
                "cores",
                str(cpu.cores),
                str(facts.cores),
                Severity.WARNING,
                f"{facts.cores} CPUs where {profile.name} has {cpu.cores}: multi-threaded "
                "estimates will be optimistic",
            )
        )
    if facts.memory_mb == 0:
        found.append(
            Mismatch(
                "memory_mb",
                str(profile.memory_mb),
                "unknown",
                Severity.WARNING,
                "the agent could not read its memory size; memory not checked",
            )
        )
    elif facts.memory_mb < MEMORY_TOLERANCE * profile.memory_mb:
        found.append(
            Mismatch(
                "memory_mb",
                str(profile.memory_mb),
                str(facts.memory_mb),
                Severity.WARNING,
                f"{facts.memory_mb} MiB is below {MEMORY_TOLERANCE:.0%} of the "
                f"{profile.memory_mb} MiB of {profile.name}: a model sized for the class may "
                "not fit",
            )
        )
    if same_arch:  # another architecture's flags say nothing about these features
        found += _features(profile, facts)
    reported = {str(r) for r in runtimes}
    if missing := [r.value for r in profile.runtimes if r.value not in reported]:
        found.append(
            Mismatch(
                "runtimes",
                ", ".join(r.value for r in profile.runtimes),
                ", ".join(sorted(reported)) or "none",
                Severity.ERROR,
                f"the agent cannot load {', '.join(missing)}, which {profile.name} runs: "
                "install the runtime (greenfleet[agent] for onnx, greenfleet[tflite] for tflite) "
                "and restart the agent",
            )
        )
    return found


def _features(profile: DeviceProfile, facts: HardwareFacts) -> list[Mismatch]:
    expected = profile.cpu.features
    if not expected:
        return []
    if not facts.cpu_flags:
        return [
            Mismatch(
                "cpu.features",
                ", ".join(f.value for f in expected),
                "none",
                Severity.WARNING,
                "the agent reported no CPU features (is /proc/cpuinfo readable?); "
                "features not checked",
            )
        ]
    have = set(facts.cpu_flags)
    found = []
    for feature in expected:
        if feature.value in have:
            continue
        critical = feature in CRITICAL_FEATURES
        found.append(
            Mismatch(
                f"cpu.features.{feature.value}",
                "present",
                "absent",
                Severity.ERROR if critical else Severity.WARNING,
                f"{profile.name} has {feature.value} but this CPU lacks it"
                + (": variants chosen for the class rely on it" if critical else ""),
            )
        )
    return found


def check_device(
    device_class: str,
    facts: HardwareFacts,
    runtimes: Iterable[ModelFormat | str],
    profiles: Mapping[str, DeviceProfile],
) -> list[Mismatch]:
    """Like :func:`check_hardware`, looking the class up; an unknown class is one error."""
    profile = profiles.get(device_class)
    if profile is None:
        known = ", ".join(sorted(profiles)) or "none"
        return [
            Mismatch(
                "device_class",
                known,
                device_class,
                Severity.ERROR,
                f"unknown device class {device_class!r}; known classes: {known}. Set "
                "device_class in the agent's config to one of them, or add "
                f"device_configs/{device_class}.yaml",
            )
        ]
    return check_hardware(profile, facts, runtimes)
