"""How much faster a precision runs than fp32 in one runtime on a CPU with a given feature.

A variant's latency is measured on the build host; a device class runs it on another CPU.
For fp32 a class's ``speed.fp32`` factor carries the host's latency over. For int8 it is not
enough: whether int8 pays depends on the instruction set (a dot product such as AVX-512 VNNI
or Arm's SDOT) and on the runtime, on the host and on the device alike. So the estimate for a
device is

    host latency x speed.fp32 x gain(host CPU) / gain(device CPU)

with the gains of ``runtimes/kernel-gains.yaml``, one row per (runtime, precision,
architecture, feature), each with where it comes from (measured, sourced, estimate, assumed).
A host that runs int8 at fp32's speed (no dot product) and a device with one then predict a
saving the host never saw, and the other way round; the figures no longer depend on which
machine ran ``models compress``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device_configs.schema import CpuArch, CpuFeature, ProfileError

GAINS_FILE = Path(__file__).resolve().parent / "runtimes" / "kernel-gains.yaml"


class Kind(StrEnum):
    """Where a figure comes from; the plan says which kind each estimate rests on."""

    MEASURED = "measured"
    SOURCED = "sourced"
    ESTIMATE = "estimate"
    ASSUMED = "assumed"


class KernelGain(BaseModel):
    """One row: fp32 time / this precision's time, same runtime, a CPU with ``feature``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtime: str = Field(pattern=r"^(onnxruntime|litert)$")
    precision: str = Field(pattern=r"^(int8|fp16)$")
    arch: CpuArch
    feature: CpuFeature | None = None  # None: the architecture's baseline SIMD
    gain: float = Field(gt=0, le=16)
    kind: Kind
    source: str = Field(min_length=10)


class GainFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gains: list[KernelGain]


@dataclass(frozen=True)
class Gain:
    """The gain a CPU gets, and the row it came from (for the plan's explanation)."""

    value: float
    kind: str  # a Kind, or "none" where no row applies (gain 1)
    basis: str  # "int8 on onnxruntime, x86_64 avx2: 1.5 (measured)"


@dataclass(frozen=True, eq=False)
class KernelTable:
    """The rows of kernel-gains.yaml; ``gain`` picks the one that applies to a CPU.

    The plan asks the same few questions for every device and variant (a fleet has a handful
    of classes and one build host), so answers are kept: ``carry`` is a dict lookup after the
    first call, which keeps planning 10,000 devices linear and cheap."""

    rows: tuple[KernelGain, ...] = ()
    _carried: dict[tuple[object, ...], tuple[float, float, str]] = field(
        default_factory=dict, repr=False
    )

    def carry(
        self,
        fp32: float,
        runtime: str,
        precision: str,
        host: tuple[str, frozenset[str] | None],
        device: tuple[str, frozenset[str]],
    ) -> tuple[float, float, str]:
        """gain(host), gain(device) for a ``precision`` variant in ``runtime``, and the
        sentence that says where both come from (with the class's ``fp32`` factor)."""
        key = (fp32, runtime, precision, host, device)
        known: tuple[float, float, str] | None = self._carried.get(key)
        if known is None:
            host_arch, host_flags = host
            on_host = self.gain(runtime, precision, host_arch, host_flags or frozenset())
            here = self.gain(runtime, precision, *device)
            recorded = "" if host_flags is not None else ", host flags not recorded"
            known = self._carried[key] = (
                on_host.value,
                here.value,
                f"fp32 x{fp32:g} (class) x {precision} gain on {runtime}: build host "
                f"{on_host.basis}{recorded} / class {here.basis}",
            )
        return known

    def gain(self, runtime: str, precision: str, arch: str, features: frozenset[str]) -> Gain:
        """The largest gain among the rows of this runtime, precision and architecture whose
        feature the CPU has (a baseline row applies to every CPU of its architecture). No
        row: gain 1, i.e. the host's measured ratio to fp32 is taken to carry over."""
        best: KernelGain | None = None
        for row in self.rows:
            if (row.runtime, row.precision, row.arch.value) != (runtime, precision, arch):
                continue
            if row.feature is not None and row.feature.value not in features:
                continue
            if best is None or row.gain > best.gain:
                best = row
        if best is None:
            return Gain(1.0, "none", f"no {precision} figure for {runtime} on {arch}: 1.0")
        where = f"{arch} {best.feature.value}" if best.feature else f"{arch} baseline"
        return Gain(best.gain, best.kind.value, f"{where}: {best.gain:g} ({best.kind.value})")


@cache
def load_kernel_gains(path: Path = GAINS_FILE) -> KernelTable:
    """The table in ``path``; ProfileError naming the file and the problem if it is invalid."""
    try:
        data = yaml.safe_load(path.read_text())
        parsed = GainFile.model_validate(data)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ProfileError(
            f"{path}: {where}: {first['msg']}. See docs/device-profiles.md, 'Speed factors'."
        ) from exc
    seen: set[tuple[str, str, str, str | None]] = set()
    for row in parsed.gains:
        key = (row.runtime, row.precision, row.arch.value, row.feature)
        if key in seen:
            raise ProfileError(f"{path}: two rows for {key}; keep one")
        seen.add(key)
    return KernelTable(tuple(parsed.gains))


# ------------------------------------------------------------------------ the build host

HOST_FLAGS = "; cpu flags: "


def host_text(arch: str, cores: int, flags: list[str]) -> str:
    """What a profile records as its host: ``x86_64, 2 cores; cpu flags: avx2 fma``.

    The flags ride in the host text rather than a new Profile field, so agents of the previous
    wire version (which refuse unknown fields) still accept manifests that carry a profile."""
    return f"{arch}, {cores} cores{HOST_FLAGS}{' '.join(flags)}"


def parse_host(text: str) -> tuple[str, frozenset[str] | None]:
    """(architecture, CPU flags) of a profile's host text; flags None where the profile
    predates them (then only the architecture's baseline gain applies)."""
    head, marker, flags = text.partition(HOST_FLAGS)
    arch = head.split(",", 1)[0].strip() or "unknown"
    return arch, frozenset(flags.split()) if marker else None


def carry_ratio(here: float, host_gain: float, device_gain: float) -> float:
    """A variant's time as a share of fp32's on the device, from its share ``here`` on the
    build host and the two CPUs' kernel gains.

    A variant that gains what the host's kernels promise (``here <= 1/host_gain``) or more is
    compute-bound: the device's gain replaces the host's in proportion. One that gains less
    is partly bound by what int8 does not speed up (quantize steps, small layers, the call
    itself): that share, ``(here - 1/host_gain) / (1 - 1/host_gain)``, stays as it is and only
    the rest gains the device's factor. One not faster than fp32 here (``here >= 1``) is taken
    to be no faster there. Scaling every variant in proportion made a tiny model whose int8 runs
    at 0.9x fp32 here look like 0.68x on a dot-product class.
    """
    if here >= 1.0:
        return here
    floor = 1.0 / host_gain
    if here <= floor or host_gain <= 1.0:
        return here * host_gain / device_gain
    fixed = (here - floor) / (1.0 - floor)
    return fixed + (1.0 - fixed) / device_gain
