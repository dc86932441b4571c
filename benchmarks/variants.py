"""Variants: what each compression technique buys on this CPU, against fp32 in the same run.

For each sample model (vibration-ae, surface-cnn): the fp32 reference made as the pipeline makes
it, a 600-input calibration set split into its building and held-out parts, and every builder
in :data:`model_store.variants.BUILDERS` run directly on a :class:`BuildContext` (not through
the catalog). Each variant file is then measured against fp32: size (ONNX against fp32 ONNX,
TFLite against ``tflite-fp32``), latency in the runtime that loads it (onnxruntime or LiteRT,
one thread, single samples, fp32 and the variant timed in alternating blocks over several
rounds so that noise lands on both, medians compared), and fidelity on the held-out inputs (the
task metric against the model's accuracy floor; for the anomaly model also alarm agreement with
fp32 at its threshold).

TFLite variants need TensorFlow, which the main environment lacks: this module runs itself in
``.venv-tf`` (``--tflite-only``) to build and time them there, with fp32 ONNX timed in that same
process as the base of the cross-runtime ratio. ::

    python -m benchmarks.variants [--quick] [--json OUT]
    python -m benchmarks.variants --tflite-only WORKDIR --json OUT [--quick]   (in .venv-tf)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.protocol import ModelFormat, Task
from agent.runtime import LoadedModel, ModelRuntimeError, load_model
from model_store import profile
from model_store.variants import BUILDERS
from model_store.variants.base import (
    BuildContext,
    BuiltVariant,
    Calibration,
    ModelInfo,
    VariantError,
)

if TYPE_CHECKING:
    from benchmarks.rig import Outcome

log = logging.getLogger(__name__)

NAME = "variants"
TITLE = "Compressed variants vs fp32: size, latency, fidelity"
ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = ROOT / "model_store" / "samples"
SAMPLES = ("vibration-ae", "surface-cnn")
CNN = "surface-cnn"
CALIBRATION_SIZE = 600
TF_PYTHON = ROOT / ".venv-tf" / "bin" / "python"
TF_TIMEOUT_S = 300.0
NO_TF_VENV = "TFLite: not measured (run tests/tf_env/run.sh to create .venv-tf)"

INT8_MAX_SIZE = 0.30  # target (a): an int8 variant of the CNN at most this share of fp32's size
STUDENT_MIN_SHRINK = 4.0  # target (b): the student at least this many times smaller than fp32
RULES_ALARM = 1.0  # a rule baseline's score above 1 is an alarm (see model_store.variants.rules)

# Latency: rounds of alternating blocks; each block is CALLS single-sample runs of one model.
FULL = {"rounds": 20, "calls": 200, "warmup": 100}
QUICK = {"rounds": 3, "calls": 50, "warmup": 20}
TIMING_INPUTS = profile.LATENCY_SAMPLES

REFERENCE_FILE = "fp32.onnx"
CALIBRATION_FILE = "calibration.npz"
TASK_ALIASES = {"anomaly-detection": Task.ANOMALY}  # as the catalog reads sample metadata


@dataclass(frozen=True)
class Sample:
    """A sample model and what its metadata JSON says about judging it."""

    info: ModelInfo
    source: Path
    floor: float
    threshold: float | None


def load_sample(name: str) -> Sample:
    """Read a sample's metadata JSON (model_store/samples/NAME.json)."""
    meta = json.loads((SAMPLES_DIR / f"{name}.json").read_text())
    (model_input,) = meta["inputs"]
    info = ModelInfo(
        name=name,
        version=meta["version"],
        task=TASK_ALIASES.get(meta["task"]) or Task(meta["task"]),
        input_name=model_input["name"],
        sample_shape=tuple(int(d) for d in model_input["shape"][1:]),
        output_names=tuple(o["name"] for o in meta["outputs"]),
    )
    return Sample(
        info, SAMPLES_DIR / f"{name}.onnx", float(meta["accuracy_floor"]), meta.get("threshold")
    )


@dataclass
class Row:
    """One variant of one model, as measured here."""

    variant: str
    format: str  # "onnx", "tflite" or "rules" (data, run by the agent in numpy)
    precision: str
    size_bytes: int
    size_ratio: float  # against fp32 of the same format family
    runtime: str
    p50_us: float | None = None
    base_p50_us: float | None = None  # fp32 in the same runtime, timed in the same rounds
    latency_ratio: float | None = None  # median variant / median fp32, same runtime
    ratio_range: tuple[float, float] | None = None  # lowest and highest per-round ratio
    onnx_ratio: float | None = None  # TFLite rows: against fp32 ONNX on onnxruntime
    metric: str | None = None
    metric_value: float | None = None
    agreement: float | None = None  # alarm agreement (anomaly) or argmax agreement with fp32
    correlation: float | None = None
    verdict: str = ""  # "ok", "metric<floor" or "alarms<floor"
    note: str = ""


@dataclass
class SampleResult:
    rows: list[Row] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # variant or builder -> reason
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ timing

Runner = Callable[[int], object]  # runs one model on timing input i


@dataclass(frozen=True)
class Timing:
    p50_us: float
    base_p50_us: float
    ratio: float
    low: float
    high: float


def _block(runner: Runner, calls: int, offset: int) -> np.ndarray:
    times = np.empty(calls, dtype=np.int64)
    for i in range(calls):
        start = time.perf_counter_ns()
        runner(offset + i)
        times[i] = time.perf_counter_ns() - start
    return times


def interleave(
    runners: dict[str, Runner], pairs: list[tuple[str, str]], settings: dict[str, int]
) -> dict[tuple[str, str], Timing]:
    """Time each (base, candidate) pair in alternating blocks over several rounds.

    Every round visits every pair (starting at a different one each round) and times a block
    of the base next to a block of the candidate, base first in even rounds and second in odd
    ones, so drift, neighbours' load and order effects fall on both alike.
    """
    for runner in runners.values():
        for i in range(settings["warmup"]):
            runner(i)
    blocks: dict[tuple[str, str], tuple[list[np.ndarray], list[np.ndarray]]] = {
        pair: ([], []) for pair in pairs
    }
    calls = settings["calls"]
    for r in range(settings["rounds"]):
        shift = r % len(pairs)
        for pair in pairs[shift:] + pairs[:shift]:
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for slot in order:
                blocks[pair][slot].append(_block(runners[pair[slot]], calls, r * calls))
    result = {}
    for pair, (base, candidate) in blocks.items():
        per_round = [
            float(np.median(c) / np.median(b)) for b, c in zip(base, candidate, strict=True)
        ]
        base_p50 = float(np.median(np.concatenate(base))) / 1e3
        p50 = float(np.median(np.concatenate(candidate))) / 1e3
        result[pair] = Timing(p50, base_p50, p50 / base_p50, min(per_round), max(per_round))
    return result


def load_models(files: list[BuiltVariant], failures: dict[str, str]) -> dict[str, LoadedModel]:
    """Each variant file loaded as the agent loads it; one that will not load is a failure."""
    models = {}
    for v in files:
        assert v.path is not None and v.format is not None
        try:
            models[v.variant] = load_model(v.path, v.format, threads=1)
        except ModelRuntimeError as exc:
            failures[v.variant] = f"does not load: {exc}"
    return models


def _model_runner(model: LoadedModel, inputs: np.ndarray, input_name: str) -> Runner:
    feeds = [{input_name: np.ascontiguousarray(x[None], dtype=np.float32)} for x in inputs]
    return lambda i: model.run(feeds[i % len(feeds)])


# ---------------------------------------------------------------------------------- fidelity


def _judge(sample: Sample, row: Row) -> str:
    """As the pipeline marks eligibility: the metric, and for anomaly models the alarms too."""
    value = row.metric_value if row.metric_value is not None else row.agreement
    if value is None or value < sample.floor:
        return "metric<floor"
    if sample.info.task is Task.ANOMALY and (row.agreement or 0.0) < sample.floor:
        return "alarms<floor"
    return "ok"


def _fill_fidelity(
    sample: Sample, row: Row, outputs: np.ndarray, reference: np.ndarray, heldout: Calibration
) -> None:
    threshold = sample.threshold if sample.info.task is Task.ANOMALY else None
    if row.format == "rules":
        threshold = None  # their scores are on another scale; alarm agreement is set below
    measured = profile.fidelity(sample.info.task, outputs, reference, heldout.labels, threshold)
    row.metric, row.metric_value = measured.metric, measured.metric_value
    row.agreement, row.correlation = measured.agreement, measured.correlation
    if row.format == "rules" and sample.info.task is Task.ANOMALY and threshold is None:
        scores = outputs.reshape(len(outputs), -1).mean(axis=1)
        ref_scores = reference.reshape(len(reference), -1).mean(axis=1)
        cut = sample.threshold if sample.threshold is not None else float("inf")
        row.agreement = float(np.mean((scores > RULES_ALARM) == (ref_scores > cut)))
    row.verdict = _judge(sample, row)


def _outputs(sample: Sample, path: Path, fmt: ModelFormat, heldout: Calibration) -> np.ndarray:
    info = sample.info
    return profile.run_outputs(
        path, fmt, heldout.inputs, info.input_name, output_name=info.output_names[0]
    )


def _note(variant: BuiltVariant) -> str:
    details = variant.details
    if variant.technique == "prune" and "sparsity" in details:
        return f"{100 * details['sparsity']:.0f}% zeros, stored dense"
    if variant.technique == "prune" and "layers" in details:
        # "Conv #3: 32 -> 24 units" -> "32->24"
        kept = [layer.rpartition(": ")[2].removesuffix(" units") for layer in details["layers"]]
        return "units " + ", ".join(k.replace(" -> ", "->") for k in kept)
    if variant.precision == "mixed":
        return "part stays float32"
    return ""


# ----------------------------------------------------------------------------------- ONNX side


def _builder(name: str) -> Any:
    module, _, cls = BUILDERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def build(
    names: list[str], reference: Path, info: ModelInfo, building: Calibration, workdir: Path
) -> tuple[list[BuiltVariant], dict[str, str]]:
    """Run the named builders, each in ``workdir/<builder>``; failures by name with reasons."""
    built: list[BuiltVariant] = []
    failures: dict[str, str] = {}
    for name in names:
        scratch = workdir / name
        scratch.mkdir(exist_ok=True)
        try:
            built.extend(_builder(name).build(BuildContext(reference, info, building, scratch)))
        except VariantError as exc:
            failures[exc.variant] = exc.reason
        except Exception as exc:  # a bug or a third-party failure in one builder
            log.exception("builder %s failed", name)
            failures[name] = f"unexpected error: {type(exc).__name__}: {exc}"
    return built, failures


def measure_onnx(
    sample: Sample,
    reference: Path,
    calibration: Calibration,
    built: list[BuiltVariant],
    settings: dict[str, int],
    failures: dict[str, str],
) -> list[Row]:
    """Rows for fp32, every ONNX variant and the rule baseline, timed on onnxruntime."""
    from model_store.variants.rules import evaluate_rules

    info, heldout = sample.info, calibration.heldout()
    fp32 = BuiltVariant("fp32", reference, ModelFormat.ONNX, "fp32", "reference")
    files = [fp32, *(v for v in built if v.format is ModelFormat.ONNX and v.path is not None)]
    rules = next((v.rules for v in built if v.rules is not None), None)
    inputs = heldout.inputs[:TIMING_INPUTS]
    models = load_models(files, failures)
    if "fp32" not in models:
        raise RuntimeError(f"the fp32 reference does not load: {failures.get('fp32')}")
    files = [v for v in files if v.variant in models]
    runners: dict[str, Runner] = {
        name: _model_runner(model, inputs, info.input_name) for name, model in models.items()
    }
    # fp32 against itself is the control: how far apart two identical models measure here.
    pairs = [("fp32", v.variant) for v in files]
    if rules is not None:
        runners["rules"] = lambda i: evaluate_rules(rules, inputs[i % len(inputs)])
        pairs.append(("fp32", "rules"))
    try:
        timings = interleave(runners, pairs, settings)
    finally:
        for model in models.values():
            model.close()
    reference_out = _outputs(sample, reference, ModelFormat.ONNX, heldout)
    base_bytes = reference.stat().st_size
    rows = []
    for v in files:
        assert v.path is not None
        t = timings[("fp32", v.variant)]
        row = Row(
            variant=v.variant,
            format="onnx",
            precision=v.precision,
            size_bytes=v.path.stat().st_size,
            size_ratio=v.path.stat().st_size / base_bytes,
            runtime="onnxruntime",
            p50_us=t.p50_us,
            base_p50_us=t.base_p50_us,
            latency_ratio=t.ratio,
            ratio_range=(t.low, t.high),
            note=_note(v) if v.variant != "fp32" else "control: fp32 timed against itself",
        )
        _fill_fidelity(
            sample, row, _outputs(sample, v.path, ModelFormat.ONNX, heldout), reference_out, heldout
        )
        rows.append(row)
    if rules is not None:
        size = len(json.dumps(rules).encode())
        t = timings[("fp32", "rules")]
        row = Row(
            variant="rules",
            format="rules",
            precision="rules",
            size_bytes=size,
            size_ratio=size / base_bytes,
            runtime="numpy",
            p50_us=t.p50_us,
            base_p50_us=t.base_p50_us,
            latency_ratio=t.ratio,
            ratio_range=(t.low, t.high),
            note=f"{rules['kind']} in JSON, evaluated in numpy",
        )
        shape = reference_out.shape[1:]
        outputs = np.stack([evaluate_rules(rules, x).reshape(shape) for x in heldout.inputs])
        _fill_fidelity(sample, row, outputs, reference_out, heldout)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------- TFLite side


def measure_tflite(workdir: Path, settings: dict[str, int]) -> dict[str, Any]:
    """Build and time the TFLite variants of every sample prepared in ``workdir``.

    Needs TensorFlow (for the converter) and LiteRT; run in .venv-tf by :func:`run`. Each
    sample folder holds the fp32 reference and the calibration set the main run used.
    """
    import onnxruntime as ort

    results: dict[str, Any] = {"onnxruntime": ort.__version__, "samples": {}}
    try:
        results["litert"] = importlib.import_module("ai_edge_litert").__version__
    except (ImportError, AttributeError):
        results["litert"] = None
    for name in SAMPLES:
        sample = load_sample(name)
        folder = workdir / name
        reference = folder / REFERENCE_FILE
        calibration = Calibration.load(folder / CALIBRATION_FILE)
        built, failures = build(["tflite"], reference, sample.info, calibration.building(), folder)
        result = SampleResult(failures=failures)
        if built:
            result.rows = _tflite_rows(sample, reference, calibration, built, settings, failures)
            skipped = built[0].details.get("skipped", {})
            result.failures |= {k: str(v) for k, v in skipped.items()}
            results["tensorflow"] = built[0].details.get("tensorflow")
        results["samples"][name] = asdict(result)
    return results


def _tflite_rows(
    sample: Sample,
    reference: Path,
    calibration: Calibration,
    built: list[BuiltVariant],
    settings: dict[str, int],
    failures: dict[str, str],
) -> list[Row]:
    """Rows for the TFLite variants, timed on LiteRT against tflite-fp32 and fp32 ONNX."""
    info, heldout = sample.info, calibration.heldout()
    files = [v for v in built if v.format is ModelFormat.TFLITE and v.path is not None]
    inputs = heldout.inputs[:TIMING_INPUTS]
    fp32 = BuiltVariant("fp32", reference, ModelFormat.ONNX, "fp32", "reference")
    models = load_models([fp32, *files], failures)
    if "fp32" not in models:
        raise RuntimeError(f"the fp32 reference does not load: {failures.get('fp32')}")
    files = [v for v in files if v.variant in models]
    base = next((v for v in files if v.variant == "tflite-fp32"), None)
    runners = {n: _model_runner(m, inputs, info.input_name) for n, m in models.items()}
    pairs = [("fp32", v.variant) for v in files]
    if base is not None:
        pairs += [(base.variant, v.variant) for v in files if v is not base]
    try:
        timings = interleave(runners, pairs, settings)
    finally:
        for model in models.values():
            model.close()
    reference_out = _outputs(sample, reference, ModelFormat.ONNX, heldout)
    base_bytes = base.path.stat().st_size if base is not None and base.path else None
    rows = []
    for v in files:
        assert v.path is not None
        size = v.path.stat().st_size
        cross = timings[("fp32", v.variant)]
        same = None if base is None or v is base else timings[(base.variant, v.variant)]
        row = Row(
            variant=v.variant,
            format="tflite",
            precision=v.precision,
            size_bytes=size,
            size_ratio=size / (base_bytes or reference.stat().st_size),
            runtime="litert",
            p50_us=cross.p50_us,
            onnx_ratio=cross.ratio,
            note=_note(v) if base is not None else "no tflite-fp32: sizes against fp32 ONNX",
        )
        if same is not None:
            row.base_p50_us, row.latency_ratio = same.base_p50_us, same.ratio
            row.ratio_range = (same.low, same.high)
        elif v is base:
            row.base_p50_us, row.latency_ratio = cross.p50_us, 1.0
            row.note = "LiteRT baseline; x fp32 ORT is the cross-runtime ratio"
        _fill_fidelity(
            sample,
            row,
            _outputs(sample, v.path, ModelFormat.TFLITE, heldout),
            reference_out,
            heldout,
        )
        rows.append(row)
    return rows


def _tflite_elsewhere(workdir: Path, quick: bool) -> dict[str, Any] | str:
    """TFLite results: in this process if TensorFlow is here, else from .venv-tf; or why not."""
    settings = QUICK if quick else FULL
    if importlib.util.find_spec("tensorflow") is not None:
        return measure_tflite(workdir, settings)
    if not TF_PYTHON.exists():
        return NO_TF_VENV
    out = workdir / "tflite.json"
    command = [str(TF_PYTHON), "-m", "benchmarks.variants", "--tflite-only", str(workdir)]
    command += ["--json", str(out), *(["--quick"] if quick else [])]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TF_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"TFLite: not measured ({TF_PYTHON} failed: {exc})"
    if done.returncode != 0 or not out.exists():
        tail = " ".join(done.stderr.strip().splitlines()[-1:]) or f"exit {done.returncode}"
        return f"TFLite: not measured (the .venv-tf run failed: {tail})"
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


# -------------------------------------------------------------------------------- judgement


def judge_int8(sample: Sample, rows: list[Row]) -> tuple[bool, list[str]]:
    """Target (a): some int8 variant of the CNN at most 0.30x fp32's size, faster, within floor.

    One line per int8 variant, saying how it fares on each of the three.
    """
    lines = []
    met = False
    for row in rows:
        if "int8" not in row.variant:
            continue
        small = row.size_ratio <= INT8_MAX_SIZE
        fast = row.latency_ratio is not None and row.latency_ratio < 1.0
        faithful = row.verdict != "metric<floor"
        met |= small and fast and faithful
        checks = [
            f"size {row.size_ratio:.3f}x ({'ok' if small else 'MISS'})",
            f"latency {_ratio(row.latency_ratio)} fp32 on {row.runtime} "
            f"({'ok' if fast else 'MISS'})",
            f"{row.metric} {_num(row.metric_value)} vs floor {sample.floor:g} "
            f"({'ok' if faithful else 'MISS'})",
        ]
        lines.append(f"{row.variant}: " + ", ".join(checks))
    if not lines:
        lines.append("no int8 variant was built")
    return met, lines


def judge_student(sample: Sample, rows: list[Row]) -> tuple[bool, str]:
    """Target (b): the student at least 4x smaller than its fp32 teacher, metric within floor."""
    row = next((r for r in rows if r.variant == "student"), None)
    if row is None:
        return False, "no student was built"
    shrink = 1 / row.size_ratio
    metric_ok = row.metric_value is not None and row.metric_value >= sample.floor
    ok = shrink >= STUDENT_MIN_SHRINK and metric_ok
    text = f"{shrink:.1f}x smaller, {row.metric} {_num(row.metric_value)} (floor {sample.floor:g})"
    if sample.info.task is Task.ANOMALY:
        text += f", alarm agreement {_num(row.agreement)}"
    return ok, text


# --------------------------------------------------------------------------------- reporting


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


HEADER = [
    "variant",
    "format",
    "precision",
    "bytes",
    "size x fp32",
    "runtime",
    "p50 us",
    "x fp32 (same rt)",
    "round range",
    "x fp32 ORT",
    "metric",
    "agree",
    "floor",
    "note",
]


def table_rows(rows: list[Row]) -> list[list[str]]:
    cells = [HEADER]
    for r in rows:
        spread = "-" if r.ratio_range is None else f"{r.ratio_range[0]:.2f}-{r.ratio_range[1]:.2f}"
        cross = r.onnx_ratio if r.format == "tflite" else r.latency_ratio
        cells.append(
            [
                r.variant,
                r.format,
                r.precision,
                str(r.size_bytes),
                _ratio(r.size_ratio),
                r.runtime,
                _num(r.p50_us, 1),
                _ratio(r.latency_ratio),
                spread,
                _ratio(cross),
                _num(r.metric_value),
                _num(r.agreement),
                r.verdict,
                r.note,
            ]
        )
    return cells


def rows_from(data: list[dict[str, Any]]) -> list[Row]:
    """Rows back from their JSON form."""
    return [Row(**{**r, "ratio_range": r["ratio_range"] and tuple(r["ratio_range"])}) for r in data]


def markdown(cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + " --- |" * len(cells[0]))
    return "\n".join(lines)


def _report(name: str, sample: Sample, result: SampleResult, heldout: int) -> str:
    from benchmarks.run import table

    metric = "ROC AUC" if sample.info.task is Task.ANOMALY else "accuracy"
    head = f"{name}: {metric} on {heldout} held-out inputs, floor {sample.floor:g}"
    if sample.threshold is not None:
        head += f"; alarms at score > {sample.threshold:g}"
    lines = [head, table(table_rows(result.rows))]
    lines += [f"  not built: {k}: {why}" for k, why in result.failures.items()]
    lines += [f"  {note}" for note in result.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- run


def prepare(name: str, workdir: Path) -> tuple[Sample, Path, Calibration]:
    """The fp32 reference and the calibration set of one sample, written under ``workdir``."""
    from model_store.samples.calibration import calibration_set
    from model_store.variants.reference import optimize_reference

    sample = load_sample(name)
    folder = workdir / name
    folder.mkdir(parents=True)
    reference, _normalized = optimize_reference(sample.source, folder / REFERENCE_FILE)
    calibration = calibration_set(name, n=CALIBRATION_SIZE)
    calibration.save(folder / CALIBRATION_FILE)
    return sample, reference, calibration


def measure(quick: bool) -> tuple[dict[str, Sample], dict[str, SampleResult], dict[str, Any]]:
    """Build and measure every sample's variants; the results and facts about the run."""
    import onnxruntime as ort

    settings = QUICK if quick else FULL
    samples: dict[str, Sample] = {}
    results: dict[str, SampleResult] = {}
    facts: dict[str, Any] = {"onnxruntime": ort.__version__, "timing": settings, "heldout": {}}
    with tempfile.TemporaryDirectory(prefix="gf-bench-variants-") as tmp:
        workdir = Path(tmp)
        for name in SAMPLES:
            sample, reference, calibration = prepare(name, workdir)
            samples[name] = sample
            facts["heldout"][name] = len(calibration.heldout().inputs)
            onnx_builders = [b for b in BUILDERS if b != "tflite"]
            built, failures = build(
                onnx_builders, reference, sample.info, calibration.building(), workdir / name
            )
            result = SampleResult(failures=failures)
            result.rows = measure_onnx(sample, reference, calibration, built, settings, failures)
            results[name] = result
        tflite = _tflite_elsewhere(workdir, quick)
    if isinstance(tflite, str):
        facts["tflite"] = tflite
        for result in results.values():
            result.notes.append(tflite)
        return samples, results, facts
    facts |= {f"tflite_{k}": v for k, v in tflite.items() if k != "samples"}
    for name, found in tflite["samples"].items():
        rows = rows_from(found["rows"])
        results[name].rows += rows
        results[name].failures |= found["failures"]
        if rows:
            results[name].notes.append(
                "TFLite rows: built and timed in .venv-tf (TensorFlow "
                f"{tflite.get('tensorflow')}, LiteRT {tflite.get('litert')}); 'x fp32 ORT' is "
                "against fp32 ONNX timed on onnxruntime in that same process"
            )
    return samples, results, facts


def run(quick: bool) -> Outcome:
    from benchmarks.rig import outcome

    started = time.monotonic()
    samples, results, facts = measure(quick)
    for name, result in results.items():
        heldout = facts["heldout"][name]
        print(_report(name, samples[name], result, heldout), end="\n\n", flush=True)
    int8_met, int8_lines = judge_int8(samples[CNN], results[CNN].rows)
    students = {name: judge_student(samples[name], results[name].rows) for name in SAMPLES}
    print(
        f"(a) {CNN} int8 <= {INT8_MAX_SIZE:.2f}x size, faster, within floor: "
        + ("MET" if int8_met else "NOT MET")
    )
    for line in int8_lines:
        print(f"    {line}")
    for name, (ok, text) in students.items():
        print(
            f"(b) {name} student >= {STUDENT_MIN_SHRINK:g}x smaller within floor: "
            f"{'MET' if ok else 'NOT MET'} ({text})"
        )
    int8_rows = [r for r in results[CNN].rows if "int8" in r.variant]
    best = min(int8_rows, key=lambda r: r.size_ratio, default=None)
    fp32 = next(r for r in results[CNN].rows if r.variant == "fp32")
    passed = int8_met and all(ok for ok, _ in students.values())
    shrinks = [
        f"{1 / r.size_ratio:.1f}x"
        for n in SAMPLES
        for r in results[n].rows
        if r.variant == "student"
    ]
    return outcome(
        NAME,
        TITLE,
        measured=(
            f"{CNN} int8 {'met' if int8_met else 'not met'}"
            + (f" (smallest {best.variant} {best.size_ratio:.2f}x)" if best else "")
            + f"; students {', '.join(shrinks) or 'not built'} smaller"
        ),
        baseline=f"fp32 in the same run ({CNN} {fp32.size_bytes} B, p50 {_num(fp32.p50_us, 1)} us)",
        ratio=best.size_ratio if best else float("nan"),
        target=f"int8 <= {INT8_MAX_SIZE:.2f}x, faster, floor; student >= {STUDENT_MIN_SHRINK:g}x",
        passed=passed,
        numbers={
            **facts,
            "seconds": round(time.monotonic() - started, 1),
            "int8": {"met": int8_met, "variants": int8_lines},
            "students": {n: {"met": ok, "summary": text} for n, (ok, text) in students.items()},
            "samples": {n: asdict(r) for n, r in results.items()},
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.variants", description=TITLE)
    parser.add_argument("--quick", action="store_true", help="fewer latency rounds and calls")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument(
        "--tflite-only",
        type=Path,
        metavar="WORKDIR",
        help="only build and time TFLite variants of the samples prepared in WORKDIR",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.tflite_only is not None:
        report: Any = measure_tflite(args.tflite_only, QUICK if args.quick else FULL)
    else:
        report = run(args.quick)
        if args.markdown:
            for name, found in report["numbers"]["samples"].items():
                print(f"\n{name}\n\n{markdown(table_rows(rows_from(found['rows'])))}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
