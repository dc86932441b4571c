"""``models compress``: build every variant of a model version, profile it, judge it, sign it.

Order of work: an fp32 reference (graph-optimized with onnxruntime) is made from the source
ONNX; every builder in :data:`model_store.variants.BUILDERS` runs on it in its own scratch
directory; every resulting file, the source and any imported variants are profiled against the
reference on the held-out part of the calibration data; a variant whose task metric falls below
the version's accuracy floor is kept but marked ineligible with the reason; each variant gets a
manifest with golden cases, signed with the controller's key. A builder that fails is reported
by name with its reason and the others still run. Files reach the store only when finished.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import importlib
import json
import logging
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from agent.protocol import (
    GoldenCase,
    Manifest,
    ModelFormat,
    Profile,
    Task,
    encode,
    utcnow,
)
from agent.runtime import load_model
from agent.runtime.base import LoadedModel
from model_store.build_cost import BuildCost
from model_store.build_cost import Meter as BuildMeter
from model_store.build_cost import total as total_cost
from model_store.catalog import Catalog, ModelVersion, Variant, now_iso, signature_of
from model_store.eligibility import BASELINES, judge, payoff_note
from model_store.errors import ModelStoreError
from model_store.signing import Signer
from model_store.variants import BUILDERS
from model_store.variants.base import (
    BuildContext,
    BuiltVariant,
    Calibration,
    ModelInfo,
    VariantError,
)
from model_store.variants.reference import optimize_reference

log = logging.getLogger(__name__)

GOLDEN_CASES = 3
MANIFEST_VALIDITY = timedelta(days=365)
# Golden outputs are the variant's own outputs on this host; other CPUs round differently.
TOLERANCES = {"fp32": (1e-3, 1e-4), "fp16": (1e-2, 1e-3), "int8": (5e-2, 1e-2)}

Progress = Callable[[str, int, int, str], None]  # (stage, done, total, label)


@dataclass
class CompressReport:
    """What one ``compress`` produced, and what it could not."""

    version: ModelVersion
    variants: list[Variant] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (variant or builder, reason)
    rules: dict[str, Any] | None = None
    # what each step cost ("fp32", each builder, "profile"), and the whole run: see build_cost
    costs: dict[str, BuildCost] = field(default_factory=dict)
    cost: BuildCost | None = None


def model_info(version: ModelVersion, *, need_task: bool = True) -> ModelInfo:
    """Builder-facing facts; ModelStoreError if the version cannot be compressed (or, without
    ``need_task``, signed: the manifest's task then defaults to regression)."""
    if version.task is None and need_task:
        raise ModelStoreError(
            f"{version.id} has no task; add it again with --task or --meta, "
            "so fidelity can be judged"
        )
    if len(version.inputs) != 1:
        raise ModelStoreError(f"{version.id}: compress supports models with one input")
    shape = version.inputs[0].shape
    if not shape or shape[0] not in (1, None) or any(d is None for d in shape[1:]):
        raise ModelStoreError(
            f"{version.id}: input shape {shape} must be [1, fixed dims...] to be compressed"
        )
    return ModelInfo(
        name=version.name,
        version=version.version,
        task=version.task or Task.REGRESSION,
        input_name=version.inputs[0].name,
        sample_shape=tuple(int(d) for d in shape[1:] if d is not None),
        output_names=tuple(o.name for o in version.outputs),
    )


@functools.cache
def _libc() -> Any | None:
    """The C library the interpreter runs on, if it is glibc (it has ``malloc_trim``)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def return_freed_memory() -> None:
    """Give the heap pages the last step freed back to the OS before the next step starts.

    glibc keeps them: after the fp16 build of a ResNet-50, RSS stood at 650 MiB around 160 MiB
    of live data, so every later step's peak started from the previous step's. Without glibc
    (musl, macOS) only the garbage collector runs.
    """
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _builder(name: str) -> Any:
    module, _, cls = BUILDERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def golden_cases(model: LoadedModel, info: ModelInfo, inputs: np.ndarray) -> list[GoldenCase]:
    """Inputs with this variant's own outputs, for the agent's smoke test before activation."""
    cases = []
    for sample in inputs[:GOLDEN_CASES]:
        feed = sample[np.newaxis].astype(np.float32)
        outputs = model.run({model.inputs[0].name: feed})
        cases.append(
            GoldenCase(
                inputs={info.input_name: feed.ravel().tolist()},
                outputs={k: np.asarray(v, np.float64).ravel().tolist() for k, v in outputs.items()},
            )
        )
    return cases


def compress(
    catalog: Catalog,
    signer: Signer,
    version_id: str,
    calibration: Calibration | None,
    workroot: Path,
    *,
    only: Sequence[str] | None = None,
    progress: Progress = lambda stage, done, total, label: None,
    latency_runs: int = 200,
) -> CompressReport:
    """Build, profile, judge and sign every variant of ``version_id``."""
    from model_store import profile as profiling

    version = catalog.version(version_id)
    info = model_info(version)
    source = catalog.get(version.id)
    if source.format is not ModelFormat.ONNX:
        raise ModelStoreError(
            f"{version.id} was added as {source.format.value}; compress needs an ONNX source"
        )
    if calibration is not None:
        calibration.check_shape(info.sample_shape)
    building = calibration.building() if calibration is not None else None
    heldout = calibration.heldout() if calibration is not None else None
    unknown = sorted(set(only or ()) - set(BUILDERS))
    if unknown:
        raise ModelStoreError(f"unknown builders {unknown}; choose from {', '.join(BUILDERS)}")
    names = [n for n in BUILDERS if not only or n in only]
    report = CompressReport(version)
    workdir = workroot / f"compress-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True)
    meter, spent = BuildMeter(), dict[str, list[BuildCost]]()
    try:
        total = len(names) + 1
        progress("build", 0, total, "fp32 reference")
        with meter.measure(spent.setdefault("fp32", [])):
            reference, normalized = optimize_reference(source.path, workdir / "fp32.onnx")
        return_freed_memory()
        built: list[BuiltVariant] = [
            BuiltVariant(
                "fp32",
                reference,
                ModelFormat.ONNX,
                "fp32",
                "reference",
                notes=(*normalized, "onnxruntime basic graph optimizations"),
                details={"built_by": "fp32"},
            )
        ]
        for done, name in enumerate(names, start=1):
            progress("build", done, total, name)
            scratch = workdir / name
            scratch.mkdir()
            ctx = BuildContext(
                reference=reference, info=info, calibration=building, workdir=scratch
            )
            try:
                with meter.measure(spent.setdefault(name, [])):
                    made = _builder(name).build(ctx)
                for variant in made:  # whose build this variant's cost is part of
                    variant.details.setdefault("built_by", name)
                built.extend(made)
            except VariantError as exc:
                report.failures.append((exc.variant, exc.reason))
                log.info("%s", exc)  # reported to the caller in the CompressReport
            except Exception as exc:  # a bug or a third-party failure in one builder
                log.exception("builder %s failed", name)
                report.failures.append((name, f"unexpected error: {type(exc).__name__}: {exc}"))
            return_freed_memory()
        progress("build", total, total, "done")

        with meter.measure(spent.setdefault("profile", [])):
            reference_outputs = (
                profiling.run_outputs(
                    reference,
                    ModelFormat.ONNX,
                    heldout.inputs,
                    info.input_name,
                    output_name=info.output_names[0],
                )
                if heldout is not None
                else None
            )
            for variant in built:
                if variant.path is None and variant.rules is not None:
                    report.rules = variant.rules
            catalog.update_version(
                version.id,
                rules=None if report.rules is None else json.dumps(report.rules),
                compressed=now_iso(),
            )
            version = catalog.version(version.id)

            files = [v for v in built if v.path is not None and v.format is not None]
            existing = [
                v for v in catalog.variants(version.id) if v.technique in ("source", "imported")
            ]
            steps = len(files) + len(existing)

            def profiled(name: str, path: Path, fmt: ModelFormat) -> Profile | None:
                try:
                    return profiling.profile_variant(
                        path,
                        fmt,
                        info,
                        heldout,
                        reference_outputs,
                        runs=latency_runs,
                        threshold=version.threshold,
                    )
                except ModelStoreError as exc:
                    report.failures.append((name, f"profiling failed: {exc}"))
                    return None

            for done, variant in enumerate(files):
                return_freed_memory()
                progress("profile", done, steps, variant.variant)
                assert variant.path is not None and variant.format is not None
                profile = profiled(variant.variant, variant.path, variant.format)
                if profile is None:
                    continue
                eligible, reason = judge(version, profile, variant.technique)
                stored = catalog.put_variant(
                    version,
                    variant.variant,
                    variant.path,
                    variant.format,
                    precision=variant.precision,
                    technique=variant.technique,
                    eligible=eligible,
                    reason=reason,
                    notes=variant.notes,
                    details=variant.details,
                    profile=profile,
                )
                report.variants.append(
                    _sign(catalog, signer, version, info, stored, heldout, building)
                )
            for done, stored in enumerate(existing, start=len(files)):
                return_freed_memory()
                progress("profile", done, steps, stored.variant or "source")
                profile = profiled(stored.variant or "source", stored.path, stored.format)
                if profile is None:
                    continue
                eligible, reason = judge(version, profile, stored.technique or "")
                catalog.update_variant(
                    stored.id,
                    profile=encode(profile).decode(),
                    eligible=int(eligible),
                    reason=reason,
                )
                report.variants.append(
                    _sign(catalog, signer, version, info, catalog.get(stored.id), heldout, building)
                )
            progress("profile", steps, steps, "done")
            _note_payoff(catalog, report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report.costs = {step: total_cost(parts) for step, parts in spent.items()}
    report.cost = total_cost(list(report.costs.values()))
    catalog.update_version(
        version.id,
        build_cost=json.dumps(
            {"total": msgspec.to_builtins(report.cost), "steps": msgspec.to_builtins(report.costs)}
        ),
    )
    report.variants.sort(key=lambda v: v.variant)
    return report


def _note_payoff(catalog: Catalog, report: CompressReport) -> None:
    """Add to each variant that does not run faster than fp32 in its runtime on this host a
    note saying so and why (:func:`model_store.eligibility.payoff_note`)."""
    from agent.hardware import read_hardware

    features = frozenset(read_hardware().cpu_flags)

    def p50(variant: Variant) -> dict[str, float]:
        latency = variant.profile.latency if variant.profile is not None else {}
        return {runtime: stats.p50_ms for runtime, stats in latency.items()}

    by_name = {v.variant: v for v in report.variants}
    baseline: dict[str, float] = {}
    for runtime, name in BASELINES.items():
        if name in by_name and runtime in p50(by_name[name]):
            baseline[runtime] = p50(by_name[name])[runtime]
    for i, variant in enumerate(report.variants):
        note = payoff_note(
            variant.variant or "",
            variant.precision or "",
            variant.technique or "",
            p50(variant),
            baseline,
            features,
        )
        if note is not None:
            catalog.update_variant(variant.id, notes=json.dumps([*variant.notes, note]))
            report.variants[i] = catalog.get(variant.id)


def profile_added(catalog: Catalog, variant_id: str, *, runs: int = 50) -> Variant:
    """Profile a file just added (``models add``) on its own runtime: size, MACs, peak memory
    and latency, no fidelity (that needs ``compress --calibration``). The plan prices a
    variant by its profile, so a model added as .tflite alone was "not profiled on litert"
    and could not be planned until now. ModelStoreError (nothing stored) if it cannot be run
    the way the profiler feeds it (one input of a fixed shape)."""
    from model_store import profile as profiling

    variant = catalog.get(variant_id)
    version = catalog.version(variant.base)
    info = model_info(version, need_task=False)
    measured = profiling.profile_variant(variant.path, variant.format, info, None, None, runs=runs)
    # the profile prices it; whether it may be deployed is compress's call, on fidelity
    catalog.update_variant(variant.id, profile=encode(measured).decode())
    return catalog.get(variant_id)


def sign_added(catalog: Catalog, signer: Signer, variant_id: str) -> Variant:
    """Sign the manifest of a model added as a file (``models add``), so enrolled agents, which
    run only what the controller signed, accept it: golden cases from seeded random inputs, no
    profile, the version's rules if any. ModelStoreError (nothing signed) if the version lacks
    what a manifest needs: one input of a fixed shape."""
    variant = catalog.get(variant_id)
    version = catalog.version(variant.base)
    info = model_info(version, need_task=False)
    return _sign(catalog, signer, version, info, variant, None, None)


def _sign(
    catalog: Catalog,
    signer: Signer,
    version: ModelVersion,
    info: ModelInfo,
    variant: Variant,
    heldout: Calibration | None,
    building: Calibration | None,
) -> Variant:
    """Attach a signed manifest (golden cases, profile, rules) to a stored variant."""
    samples = heldout or building
    inputs = (
        samples.inputs
        if samples is not None
        else np.random.default_rng(0).standard_normal((GOLDEN_CASES, *info.sample_shape))
    )
    model = load_model(variant.path, variant.format)  # once, for signature and golden cases
    try:
        (in_sigs, out_sigs), golden = signature_of(model), golden_cases(model, info, inputs)
    finally:
        model.close()
    rtol, atol = TOLERANCES.get(variant.precision or "fp32", TOLERANCES["int8"])
    manifest = Manifest(
        model=variant.ref,
        artifact=variant.artifact(),
        task=version.task or Task.REGRESSION,
        precision=variant.precision or "fp32",
        technique=variant.technique or "source",
        inputs=list(in_sigs),
        outputs=list(out_sigs),
        golden=golden,
        rtol=rtol,
        atol=atol,
        profile=variant.profile,
        rules=version.rules,
        created=utcnow(),
        expires=utcnow() + MANIFEST_VALIDITY,
    )
    signed = signer.sign(manifest)
    catalog.update_variant(variant.id, manifest=encode(signed).decode())
    return catalog.get(variant.id)
