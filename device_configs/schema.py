"""The device profile schema: what a hardware class is, with a source for every fact.

One YAML file per class lives beside this module (``rpi4.yaml`` ...); its stem is the class
name that agents report as ``device_class``. :func:`load_profiles` validates them all and
raises :class:`ProfileError` naming the file, the field, the problem and what to do.

``python -m device_configs.schema`` prints the JSON schema (committed as ``schema.json``);
``--markdown`` prints the field reference and class table used in docs/device-profiles.md.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.protocol import ModelFormat

PROFILE_DIR = Path(__file__).resolve().parent
SCHEMA_FILE = PROFILE_DIR / "schema.json"
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class ProfileError(ValueError):
    """A profile that cannot be read or validated; the message names file, field and fix."""


class CpuArch(StrEnum):
    """Machine architecture as ``platform.machine()`` spells it on Linux."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"
    ARMV7L = "armv7l"


class CpuFeature(StrEnum):
    """CPU features that matter to variants, spelled as /proc/cpuinfo and the agent spell them.

    The same set as ``agent.hardware.NOTABLE_FLAGS``, so profile and birth can be compared.
    """

    NEON = "neon"  # 32-bit Arm Advanced SIMD (armv7l kernels say "neon")
    ASIMD = "asimd"  # 64-bit Arm Advanced SIMD (aarch64 kernels say "asimd")
    ASIMDDP = "asimddp"  # Arm int8 dot product (SDOT/UDOT), Armv8.2+
    ASIMDHP = "asimdhp"  # Arm fp16 arithmetic, Armv8.2+
    SVE = "sve"
    AVX2 = "avx2"
    AVX512F = "avx512f"
    AVX512_VNNI = "avx512_vnni"  # int8 dot product on 512-bit vectors (DL Boost)
    AVX_VNNI = "avx_vnni"  # int8 dot product on 256-bit vectors (Alder Lake and later)
    AMX_INT8 = "amx_int8"
    F16C = "f16c"
    FMA = "fma"


class Precision(StrEnum):
    """Numeric precision of a model variant's compute."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class AcceleratorKind(StrEnum):
    """What kind of co-processor an accelerator is."""

    GPU = "gpu"
    NPU = "npu"
    TPU = "tpu"


# Which architectures may report each feature (arm32 kernels report asimddp/asimdhp too).
FEATURE_ARCHES: dict[CpuFeature, frozenset[CpuArch]] = {
    CpuFeature.NEON: frozenset({CpuArch.ARMV7L}),
    CpuFeature.ASIMD: frozenset({CpuArch.AARCH64}),
    CpuFeature.ASIMDDP: frozenset({CpuArch.AARCH64, CpuArch.ARMV7L}),
    CpuFeature.ASIMDHP: frozenset({CpuArch.AARCH64, CpuArch.ARMV7L}),
    CpuFeature.SVE: frozenset({CpuArch.AARCH64}),
    **{
        f: frozenset({CpuArch.X86_64})
        for f in (
            CpuFeature.AVX2,
            CpuFeature.AVX512F,
            CpuFeature.AVX512_VNNI,
            CpuFeature.AVX_VNNI,
            CpuFeature.AMX_INT8,
            CpuFeature.F16C,
            CpuFeature.FMA,
        )
    },
}
# A feature that is never present without another one (feature -> what it implies).
FEATURE_IMPLIES: dict[CpuFeature, CpuFeature] = {
    CpuFeature.AVX512F: CpuFeature.AVX2,
    CpuFeature.AVX512_VNNI: CpuFeature.AVX512F,
    CpuFeature.AVX_VNNI: CpuFeature.AVX2,
    CpuFeature.AMX_INT8: CpuFeature.AVX512F,
    CpuFeature.SVE: CpuFeature.ASIMD,
}
# Fact groups that must each have a source (key equal to the group or starting "group.").
SOURCED_FIELDS = (
    "cpu",
    "memory_mb",
    "storage_mb",
    "model_memory_mb",
    "runtimes",
    "precisions",
    "power",
    "speed",
    "latency_budget_ms",
)


def _duplicates(items: list[Any]) -> list[str]:
    return sorted(str(item) for item, n in Counter(items).items() if n > 1)


class Strict(BaseModel):
    """Base of every profile model: unknown fields are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CpuSpec(Strict):
    """The CPU of the class."""

    arch: CpuArch | None = Field(
        description="Machine architecture the agent must report; null means any (generic only)."
    )
    model: str = Field(min_length=1, description="CPU or SoC, cores and clock, for people.")
    cores: int = Field(
        ge=1, description="Logical CPUs as the OS counts them (os.cpu_count), threads included."
    )
    features: list[CpuFeature] = Field(
        default_factory=list,
        description="CPU features the class has and variants may rely on, /proc/cpuinfo spelling.",
    )

    @model_validator(mode="after")
    def _features_fit_arch(self) -> Self:
        if dup := _duplicates(self.features):
            raise ValueError(f"features lists {', '.join(dup)} more than once")
        if self.arch is None:
            if self.features:
                raise ValueError("features need an arch: set arch or remove the features")
            return self
        wrong = [f.value for f in self.features if self.arch not in FEATURE_ARCHES[f]]
        if wrong:
            raise ValueError(
                f"features {', '.join(wrong)} do not exist on {self.arch.value} "
                "(aarch64 says asimd, armv7l says neon; avx*/fma/f16c/amx are x86_64)"
            )
        for feature, implied in FEATURE_IMPLIES.items():
            if feature in self.features and implied not in self.features:
                raise ValueError(f"features lists {feature.value} but not {implied.value}")
        if (
            self.arch is CpuArch.AARCH64
            and {CpuFeature.ASIMDDP, CpuFeature.ASIMDHP} & set(self.features)
            and CpuFeature.ASIMD not in self.features
        ):
            raise ValueError("features lists asimddp or asimdhp but not asimd")
        return self


class Accelerator(Strict):
    """A co-processor that can run models (GPU, NPU, TPU)."""

    kind: AcceleratorKind = Field(description="gpu, npu or tpu.")
    name: str = Field(min_length=1, description="Product name, for people.")
    precisions: list[Precision] = Field(
        min_length=1, description="Precisions the accelerator computes in."
    )
    runtimes: list[ModelFormat] = Field(
        min_length=1, description="Model formats whose runtime can offload to it."
    )

    @model_validator(mode="after")
    def _no_duplicates(self) -> Self:
        for label, items in (("precisions", self.precisions), ("runtimes", self.runtimes)):
            if dup := _duplicates(items):
                raise ValueError(f"{label} lists {', '.join(dup)} more than once")
        return self


class PowerSpec(Strict):
    """Whole-device power, in watts."""

    idle_w: float = Field(gt=0, description="Whole-device power when idle, W.")
    active_w_per_core: float = Field(
        gt=0, description="Extra power per fully busy core (per busy CPU-second, in J/s), W."
    )
    max_w: float = Field(
        gt=0, description="The most the device can draw: its supply or power-mode limit, W."
    )
    budget_w: float = Field(
        gt=0,
        description="What the fleet plans for a device of this class at work, W; at most max_w.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.idle_w >= self.max_w:
            raise ValueError(f"idle_w {self.idle_w:g} W must be below max_w {self.max_w:g} W")
        if self.budget_w > self.max_w:
            raise ValueError(f"budget_w {self.budget_w:g} W exceeds max_w {self.max_w:g} W")
        if self.budget_w <= self.idle_w:
            raise ValueError(
                f"budget_w {self.budget_w:g} W must be above idle_w {self.idle_w:g} W, "
                "or nothing could run"
            )
        return self


class SpeedSpec(Strict):
    """How much slower than the reference host this class runs fp32, and, only where it was
    measured on the class, int8 or fp16.

    A variant's fp32 latency on the build host times ``fp32`` is the first estimate here. An
    int8 or fp16 variant's estimate also moves by the ratio of the int8 (fp16) speed-up over
    fp32 on the build host's CPU to that on this class's CPU, per runtime, from
    ``runtimes/kernel-gains.yaml`` (device_configs.kernels). A factor given here for int8 or
    fp16 replaces that derivation: give one only from a measurement on the class, and cite it.
    Telemetry replaces every estimate. Above 1 means slower than the reference.
    """

    fp32: float = Field(gt=0, description="Factor for fp32 variants (CPU speed of the class).")
    fp16: float | None = Field(
        default=None, gt=0, description="Measured factor for fp16 variants (overrides gains)."
    )
    int8: float | None = Field(
        default=None, gt=0, description="Measured factor for int8 variants (overrides gains)."
    )

    def factors(self) -> dict[str, float]:
        """Precision name -> factor, for the precisions that have one."""
        return {p.value: f for p in Precision if (f := getattr(self, p.value)) is not None}


class DeviceProfile(Strict):
    """One hardware class: what it is, what it can run, what it costs, and where that is from."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]{0,63}$",
        description="Class name, equal to the file stem; what agents report as device_class.",
    )
    description: str = Field(min_length=1, description="What devices of this class are.")
    cpu: CpuSpec
    memory_mb: int = Field(ge=1, description="Physical RAM of the class, MiB.")
    storage_mb: int = Field(ge=1, description="Storage the agent may use for model files, MiB.")
    model_memory_mb: int = Field(
        ge=1, description="RAM a running model may take (peak above baseline), MiB."
    )
    accelerators: list[Accelerator] = Field(
        default_factory=list, description="Co-processors that can run models; empty if none."
    )
    runtimes: list[ModelFormat] = Field(
        min_length=1, description="Model formats devices of this class are set up to load."
    )
    precisions: list[Precision] = Field(
        min_length=1, description="Precisions variants for this class should compute in."
    )
    power: PowerSpec
    speed: SpeedSpec
    latency_budget_ms: float = Field(
        gt=0, description="Default per-inference latency budget for devices of this class, ms."
    )
    sources: dict[str, str] = Field(
        description=(
            "Fact path (cpu, cpu.features, power.idle_w, ...) -> citation; every fact group "
            "needs one. Write 'estimate: ...' or 'policy: ...' for figures that are not quoted."
        )
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for label, items in (("runtimes", self.runtimes), ("precisions", self.precisions)):
            if dup := _duplicates(items):
                raise ValueError(f"{label} lists {', '.join(dup)} more than once")
        if self.model_memory_mb > self.memory_mb:
            raise ValueError(
                f"model_memory_mb {self.model_memory_mb} exceeds memory_mb {self.memory_mb}"
            )
        factors = self.speed.factors()
        if extra := sorted(set(factors) - {p.value for p in self.precisions} - {"fp32"}):
            raise ValueError(
                f"speed gives {', '.join(extra)}, which precisions does not declare: "
                "declare the precision or remove the factor"
            )
        for i, acc in enumerate(self.accelerators):
            if stray := [r.value for r in acc.runtimes if r not in self.runtimes]:
                raise ValueError(
                    f"accelerators.{i}.runtimes has {', '.join(stray)}, not in runtimes"
                )
        full = self.power.idle_w + self.power.active_w_per_core * self.cpu.cores
        if full > self.power.max_w:
            raise ValueError(
                f"power: idle_w + active_w_per_core x cpu.cores = {full:g} W exceeds max_w "
                f"{self.power.max_w:g} W; one of them is wrong"
            )
        self._check_sources()
        return self

    def _check_sources(self) -> None:
        required = [*SOURCED_FIELDS, *(["accelerators"] if self.accelerators else [])]
        keys = set(self.sources)
        missing = [
            f for f in required if f not in keys and not any(k.startswith(f"{f}.") for k in keys)
        ]
        if missing:
            raise ValueError(
                f"sources has no citation for {', '.join(missing)}: add "
                f"'{missing[0]}: <datasheet, URL or 'estimate: why'>' under sources"
            )
        if unknown := sorted(k for k in keys if not _is_fact_path(k)):
            raise ValueError(
                f"sources cites {', '.join(unknown)}, which is not a fact of the profile"
            )
        if blank := sorted(k for k, v in self.sources.items() if not v.strip()):
            raise ValueError(f"sources gives an empty citation for {', '.join(blank)}")


_NESTED: dict[str, type[BaseModel]] = {
    "cpu": CpuSpec,
    "power": PowerSpec,
    "speed": SpeedSpec,
    "accelerators": Accelerator,
}


def _is_fact_path(key: str) -> bool:
    head, _, rest = key.partition(".")
    if head not in DeviceProfile.model_fields or head in ("name", "description", "sources"):
        return False
    if not rest:
        return True
    nested = _NESTED.get(head)
    return nested is not None and rest in nested.model_fields


# ------------------------------------------------------------------------------------ loading


def _describe(error: Any) -> str:
    loc = [str(p) for p in error["loc"]]
    msg = str(error["msg"]).removeprefix("Value error, ")
    if not loc:  # a cross-field check: its message starts with the fields it is about
        return msg
    where = ".".join(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        model: type[BaseModel] = DeviceProfile
        for part in loc[:-1]:
            if part.isdigit():
                continue
            model = _NESTED.get(part, model)
        allowed = ", ".join(model.model_fields)
        return f"{where}: unknown field; fix its spelling or remove it (allowed: {allowed})"
    if kind == "missing":
        return f"{where}: missing; add it (see device_configs/schema.json)"
    return f"{where}: {msg}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    text = f"{problem} ({context})" if problem and context else str(problem or exc)
    return f"{where}: {' '.join(text.split())}"


def parse_profile(raw: Any, source: str) -> DeviceProfile:
    """Validate one profile's parsed YAML; ``source`` names it in errors."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{source}: must hold a mapping of fields, not {type(raw).__name__}")
    try:
        return DeviceProfile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ProfileError(
            f"{source}: {problems}. See docs/device-profiles.md for the fields."
        ) from exc


def load_profile(path: Path) -> DeviceProfile:
    """Read and validate one profile file; its ``name`` must equal the file's stem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML{_yaml_problem(exc)}; fix the syntax") from exc
    profile = parse_profile(raw, str(path))
    if profile.name != path.stem:
        raise ProfileError(
            f"{path}: name: {profile.name!r} differs from the file name; "
            f"set name: {path.stem} or rename the file to {profile.name}.yaml"
        )
    return profile


def load_profiles(directory: Path = PROFILE_DIR) -> dict[str, DeviceProfile]:
    """Every ``*.yaml`` profile in ``directory``, by class name; the first bad one raises."""
    paths = sorted(directory.glob("*.yaml"))
    if not paths:
        raise ProfileError(f"{directory}: no *.yaml device profiles found")
    return {path.stem: load_profile(path) for path in paths}


# ----------------------------------------------------------------------------- generated text


def json_schema() -> dict[str, Any]:
    """The JSON schema of a profile file, as committed in schema.json."""
    return {"$schema": SCHEMA_DIALECT, **DeviceProfile.model_json_schema()}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


def _type_text(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in prop:
        return " or ".join(_type_text(p) for p in prop["anyOf"])
    if prop.get("type") == "array":
        return f"list of {_type_text(prop['items'])}"
    if prop.get("type") == "object" and "additionalProperties" in prop:
        return f"map to {_type_text(prop['additionalProperties'])}"
    return str(prop.get("type", "any"))


def _bounds(prop: dict[str, Any]) -> str:
    marks = {
        "exclusiveMinimum": "> ",
        "minimum": ">= ",
        "minLength": "length >= ",
        "minItems": "items >= ",
    }
    found = [f"{m}{prop[k]}" for k, m in marks.items() if k in prop]
    if "pattern" in prop:
        found.append(f"matches `{prop['pattern']}`")
    return ", ".join(found)


def markdown_reference(profiles: dict[str, DeviceProfile] | None = None) -> str:
    """The field reference and the class table, as Markdown, from the schema and the profiles."""
    schema = DeviceProfile.model_json_schema()
    lines = ["| Field | Type | Required | Limits | Meaning |", "|---|---|---|---|---|"]
    sections: list[tuple[str, dict[str, Any]]] = [("", schema)]
    sections += [(f"{k}.", schema["$defs"][m.__name__]) for k, m in _NESTED.items()]
    for prefix, model in sections:
        required = set(model.get("required", []))
        for field, prop in model["properties"].items():
            desc = prop.get("description", "")
            if not desc and "$ref" in prop:
                ref = schema["$defs"][prop["$ref"].rsplit("/", 1)[-1]]
                desc = ref.get("description", "").split("\n")[0]
            shown = f"accelerators[].{field}" if prefix == "accelerators." else f"{prefix}{field}"
            lines.append(
                f"| `{shown}` | {_type_text(prop)} | "
                f"{'yes' if field in required else 'no'} | {_bounds(prop)} | {desc} |"
            )
    enums = ["", "Closed sets:", ""]
    for enum in (CpuArch, CpuFeature, Precision, AcceleratorKind, ModelFormat):
        enums.append(f"- `{enum.__name__}`: {', '.join(f'`{e.value}`' for e in enum)}")
    table = ["", _class_table(profiles if profiles is not None else load_profiles())]
    return "\n".join(lines + enums + table) + "\n"


def _class_table(profiles: dict[str, DeviceProfile]) -> str:
    rows = [
        "| Class | CPU | Cores | RAM MiB | Accelerator | Runtimes | Precisions "
        "| Idle W | W/core | Budget W | Speed fp32 | int8 gain ort/litert | Latency ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    from device_configs.kernels import load_kernel_gains

    kernels = load_kernel_gains()
    for name, p in profiles.items():
        arch = p.cpu.arch.value if p.cpu.arch else "unknown"
        features = frozenset(f.value for f in p.cpu.features)
        gains = "/".join(
            f"{kernels.gain(runtime, 'int8', arch, features).value:g}"
            for runtime in ("onnxruntime", "litert")
        )
        speed = f"{p.speed.fp32:g} | {gains}"
        rows.append(
            f"| `{name}` | {p.cpu.arch or 'any'}: {p.cpu.model} | {p.cpu.cores} | {p.memory_mb} "
            f"| {', '.join(a.name for a in p.accelerators) or '-'} "
            f"| {', '.join(r.value for r in p.runtimes)} "
            f"| {', '.join(x.value for x in p.precisions)} | {p.power.idle_w:g} "
            f"| {p.power.active_w_per_core:g} | {p.power.budget_w:g} | {speed} "
            f"| {p.latency_budget_ms:g} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--markdown"]:
        sys.stdout.write(markdown_reference())
    elif not args:
        sys.stdout.write(json_schema_text())
    else:
        sys.stderr.write("usage: python -m device_configs.schema [--markdown]\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
