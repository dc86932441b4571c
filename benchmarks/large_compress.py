"""Large compress: time and peak memory of ``models compress`` on a ResNet-50-sized classifier.

A user's first model is often a classic ImageNet classifier exported by another tool, not one of
our small samples. This builds one in code (:func:`resnet`: ResNet-50 v1.5's layout, bottleneck
blocks 3-4-6-3 on a 224x224 RGB input, 1000 classes, 25.5 M parameters, batch norm folded into
the convolutions as exporters leave it, seeded random weights, opset 13), writes a seeded
calibration set of smooth random images, and runs the CLI as a user would, each command a child
process on a fresh ``GREENFLEET_HOME``::

    greenfleet models add resnet50.onnx --name resnet50 --version 1.0.0 --task classification
    greenfleet models compress resnet50:1.0.0 --calibration calib.npz --json

Measured: wall time of ``compress`` and its peak RSS (the kernel's ``ru_maxrss`` of the child,
from ``wait4``), the per-step wall times the compress report records (fp32 reference, each
builder, profiling), and the child's RSS sampled every SAMPLE_S, from which each step's peak is
read (steps are timed inside the child; the samples are aligned to them by the report's order,
so a step shorter than a sample or two may borrow its neighbour's figure). The figure is
absolute, so it is given with the host; the ratio is peak RSS over the fp32 file size, the
model-size term of the bound in the README::

    python -m benchmarks.run large_compress [--quick]
    python -m benchmarks.large_compress [--samples N] [--only fp16,int8-static] [--runs R]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_store.variants.base import Calibration

if TYPE_CHECKING:
    from benchmarks.rig import Outcome

NAME = "large_compress"
TITLE = "models compress on a ResNet-50-sized classifier: wall time and peak RSS"
ROOT = Path(__file__).resolve().parents[1]
MODEL = "resnet50"
SIZE = 224
CLASSES = 1000
STAGES = (3, 4, 6, 3)  # bottleneck blocks per stage: ResNet-50
WIDTH = 64  # channels of the stem; each stage doubles the bottleneck width
EXPANSION = 4
OPSET = 13
SEED = 50
SAMPLES = 100  # calibration images: 70 build the variants, 30 judge them
QUICK_SAMPLES = 32
QUICK_RUNS = 20  # latency runs per variant in quick mode (the CLI's default, 200, otherwise)
SAMPLE_S = 0.1  # how often the child's RSS is read
# The bound stated in the README: peak RSS of compress at most this many times the fp32 file,
# plus the calibration inputs (compress holds them as float32), plus a fixed allowance for
# Python, numpy, onnxruntime, scikit-learn and the CLI. Measured on 2026-12-08: 0.99 GiB for
# ResNet-50 (102 MB) and 1.46 GiB for the ResNet-101 layout (178 MB), so RSS grows by ~6.7
# bytes per byte of model from ~0.35 GiB; the bound leaves ~20% on both.
RSS_PER_MODEL_BYTE = 7.0
RSS_FIXED_GIB = 0.5
BN_EPS = 1e-5
CENTRING_IMAGES = 8  # images whose mean pooled features the classifier's bias takes out


class _Builder:
    """Nodes and initializers of a graph under construction, with unique names."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}_{self.count}"

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def weight(self, kind: str, values: np.ndarray) -> str:
        name = self.name(kind)
        self.weights.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def conv_bn(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        gain: tuple[float, float] = (0.5, 1.0),
    ) -> str:
        """Conv (He-initialised) followed by a batch norm with seeded statistics, folded into
        the Conv's weight and bias, as an exporter that fuses BN leaves it."""
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        gamma = self.rng.uniform(*gain, cout)
        beta = self.rng.normal(0.0, 0.05, cout)
        mean = self.rng.normal(0.0, 0.1, cout)
        var = self.rng.uniform(0.5, 1.5, cout)
        scale = gamma / np.sqrt(var + BN_EPS)
        weight = self.weight("conv_w", w * scale[:, None, None, None])
        bias = self.weight("conv_b", beta - mean * scale)
        pad = k // 2
        return self.node(
            "Conv",
            [x, weight, bias],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
        )

    def bottleneck(self, x: str, cin: int, width: int, stride: int) -> str:
        """1x1 reduce, 3x3 (carrying the stride, v1.5), 1x1 expand; projection on the shortcut
        when the shape changes. The last BN's small gain keeps 16 residual sums in range."""
        cout = width * EXPANSION
        y = self.node("Relu", [self.conv_bn(x, cin, width, 1)])
        y = self.node("Relu", [self.conv_bn(y, width, width, 3, stride)])
        y = self.conv_bn(y, width, cout, 1, gain=(0.1, 0.3))
        shortcut = x if stride == 1 and cin == cout else self.conv_bn(x, cin, cout, 1, stride)
        return self.node("Relu", [self.node("Add", [y, shortcut])])


def resnet(
    seed: int = SEED,
    stages: tuple[int, ...] = STAGES,
    width: int = WIDTH,
    size: int = SIZE,
    classes: int = CLASSES,
) -> onnx.ModelProto:
    """A ResNet-style image classifier, ``input`` [1, 3, size, size] -> ``logits`` [1, classes].

    The defaults give ResNet-50 (25.5 M parameters, ~98 MB); smaller ``stages``, ``width`` and
    ``size`` give the same layout at test size. Same arguments, same bytes.
    """
    b = _Builder(np.random.default_rng(seed))
    x = b.node("Relu", [b.conv_bn("input", 3, width, 7, 2)])
    x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = width
    for stage, blocks in enumerate(stages):
        planes = width * 2**stage
        for block in range(blocks):
            x = b.bottleneck(x, cin, planes, 2 if stage and not block else 1)
            cin = planes * EXPANSION
    features = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    fc_w = b.rng.standard_normal((classes, cin)) / np.sqrt(cin)
    fc_b = b.rng.normal(0.0, 0.01, classes)
    # A random deep network maps every image to nearly the same pooled features, so one class
    # would win everywhere; the bias takes their mean out (as training would), so the argmax
    # follows the input and the int8 and student variants have decisions to agree with.
    mean = _mean_features(_model(b.nodes, b.weights, size, features, cin), size, seed + 1)
    b.nodes.append(
        helper.make_node(
            "Gemm",
            [features, b.weight("fc_w", fc_w), b.weight("fc_b", fc_b - fc_w @ mean)],
            ["logits"],
            name="fc",
            transB=1,
        )
    )
    model = _model(b.nodes, b.weights, size, "logits", classes)
    onnx.checker.check_model(model)
    return model


def _model(
    nodes: list[onnx.NodeProto],
    weights: list[onnx.TensorProto],
    size: int,
    output: str,
    width: int,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "resnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, width])],
        initializer=weights,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="greenfleet-bench"
    )
    model.ir_version = 7  # what opset 13 came with
    return model


def _mean_features(model: onnx.ModelProto, size: int, seed: int) -> np.ndarray:
    """The mean output of ``model`` over CENTRING_IMAGES seeded images."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    seen = images(CENTRING_IMAGES, size, seed).inputs
    rows = [sess.run(None, {"input": seen[i : i + 1]})[0][0] for i in range(len(seen))]
    mean: np.ndarray = np.mean(rows, axis=0)
    return mean


def parameters(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(w.dims)) for w in model.graph.initializer)


def images(count: int, size: int = SIZE, seed: int = SEED) -> Calibration:
    """``count`` smooth random RGB images [count, 3, size, size], normalised as ImageNet models
    expect (about zero mean, unit spread): blobs at 1/8 resolution, upsampled, plus fine noise.
    ``size`` must be a multiple of 8."""
    if size % 8:
        raise ValueError(f"size must be a multiple of 8, not {size}")
    rng = np.random.default_rng([seed, count])
    coarse = rng.uniform(0.0, 1.0, (count, 3, size // 8, size // 8))
    pixels = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)
    pixels += rng.normal(0.0, 0.05, pixels.shape)
    return Calibration(((pixels - 0.5) / 0.25).astype(np.float32))


# ------------------------------------------------------------------------------- the measurement


@dataclass
class Measured:
    """One compress run, as the child reported it and as the kernel saw it."""

    samples: int
    builders: str
    parameters: int
    model_bytes: int  # the ONNX file as added
    calibration_bytes: int  # the calibration inputs as float32
    wall_s: float
    peak_rss_kib: int
    # per step ("start-up", "fp32", each builder, "profile", "finish"): wall seconds from the
    # progress marks, the compress report's own wall seconds where it has the step, peak RSS
    steps: dict[str, dict[str, float]] = field(default_factory=dict)
    profile_peaks_mib: dict[str, float] = field(default_factory=dict)  # per variant profiled
    variants: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, GREENFLEET_HOME=str(home))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def child(marks: Path, argv: list[str]) -> int:
    """``greenfleet ARGV`` (the CLI's own ``main``) whose compress progress callback also writes
    each (stage, done, total, label) with the time to ``marks``: where each step begins."""
    from controller import cli, model_commands, output

    def stage_progress(bar: Any) -> Callable[[str, int, int, str], None]:
        show = output.stage_progress(bar)

        def update(stage: str, done: int, total: int, label: str) -> None:
            with marks.open("a") as fh:
                fh.write(json.dumps([time.monotonic(), stage, done, total, label]) + "\n")
            show(stage, done, total, label)

        return update

    setattr(model_commands, "stage_progress", stage_progress)  # noqa: B010 (a module's global)
    return cli.main(argv)


def compress_child(
    home: Path, calibration: Path, only: str | None, runs: int | None
) -> tuple[float, int, list[tuple[float, int]], list[list[Any]], dict[str, Any]]:
    """Run ``models compress --json`` as a child; its wall time, ``ru_maxrss`` (KiB), the RSS
    samples and the progress marks (monotonic seconds) and the JSON it printed."""
    marks = home / "marks.jsonl"
    command = [sys.executable, "-m", "benchmarks.large_compress", "--child", str(marks), "--"]
    command += ["models", "compress", f"{MODEL}:1.0.0", "--json", "--calibration", str(calibration)]
    command += ["--only", only] if only else []
    command += ["--runs", str(runs)] if runs else []
    out = home / "compress.json"
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    with out.open("w") as stdout:
        process = subprocess.Popen(command, cwd=ROOT, env=_env(home), stdout=stdout)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(SAMPLE_S):
                rss = _rss_kib(process.pid)
                if rss is not None:
                    samples.append((time.monotonic(), rss))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        ended = time.monotonic()
        done.set()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(
            f"models compress exited {process.returncode}: {out.read_text()[-2000:]}"
        )
    report: dict[str, Any] = json.loads(out.read_text())
    timeline = [(at - started, kib) for at, kib in samples]
    progress = [
        [at - started, *rest] for at, *rest in map(json.loads, marks.read_text().split("\n")[:-1])
    ]
    return ended - started, int(usage.ru_maxrss), timeline, progress, report


def windows(wall: float, progress: list[list[Any]]) -> list[tuple[str, float, float]]:
    """(step, start, end) from the progress marks: a build mark starts the builder it names
    (the first, "fp32 reference", the reference), a profile mark the variant it names."""
    spans: list[tuple[str, float, float]] = []
    begun, name = 0.0, "start-up"
    for at, stage, _done, _total, label in progress:
        spans.append((name, begun, at))
        if label == "done":  # the builds end where profiling starts: fp32's held-out outputs
            name = "profile fp32 outputs" if stage == "build" else "finish"
        elif stage == "build":
            name = "fp32" if label == "fp32 reference" else label
        else:
            name = f"profile {label}"
        begun = at
    spans.append((name, begun, wall))
    return [span for span in spans if span[2] > span[1] or span[0] != "start-up"]


def peak_in(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Highest RSS (MiB) sampled from ``start`` to one sample past ``end``."""
    inside = [kib for at, kib in samples if start <= at <= end + SAMPLE_S]
    return round(max(inside) / 1024, 1) if inside else 0.0


def measure(
    samples: int = SAMPLES,
    only: str | None = None,
    runs: int | None = None,
    stages: tuple[int, ...] = STAGES,
) -> Measured:
    """Build the model (``stages`` bottleneck blocks per stage) and calibration set, add it,
    compress it; what it cost."""
    with tempfile.TemporaryDirectory(prefix="gf-large-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        model_path = Path(tmp) / f"{MODEL}.onnx"
        model = resnet(stages=stages)
        onnx.save(model, str(model_path))
        weights = parameters(model)
        del model
        calibration = Path(tmp) / "calib.npz"
        calibration_set = images(samples)
        calibration_set.save(calibration)
        calibration_bytes = calibration_set.inputs.nbytes
        del calibration_set
        add = [sys.executable, "-m", "controller.cli", "models", "add", str(model_path)]
        add += ["--name", MODEL, "--version", "1.0.0", "--task", "classification"]
        subprocess.run(add, cwd=ROOT, env=_env(home), check=True, capture_output=True)
        model_path_bytes = model_path.stat().st_size
        wall, peak, timeline, progress, report = compress_child(home, calibration, only, runs)
    reported = {
        name: float(cost["wall_s"])
        for name, cost in (report.get("build_cost") or {}).get("steps", {}).items()
    }
    steps: dict[str, dict[str, float]] = {}
    profiled: dict[str, float] = {}
    for name, start, end in windows(wall, progress):
        peak_mib = peak_in(timeline, start, end)
        if name.startswith("profile "):
            profiled[name.removeprefix("profile ")] = peak_mib
            name = "profile"
        step = steps.setdefault(name, {"wall_s": 0.0, "peak_rss_mib": 0.0})
        step["wall_s"] = round(step["wall_s"] + end - start, 1)
        step["peak_rss_mib"] = max(step["peak_rss_mib"], peak_mib)
        if name in reported:
            step["reported_wall_s"] = round(reported[name], 1)
    return Measured(
        samples=samples,
        builders=only or "all",
        parameters=weights,
        model_bytes=model_path_bytes,
        calibration_bytes=calibration_bytes,
        wall_s=round(wall, 1),
        peak_rss_kib=peak,
        steps=steps,
        profile_peaks_mib=profiled,
        variants=[row["variant"] for row in report.get("variants", [])],
        failures=list(report.get("failures", [])),
    )


def bound_kib(m: Measured) -> int:
    """The stated bound on compress's peak RSS for this model and calibration set."""
    fixed = RSS_FIXED_GIB * 2**30
    return int((RSS_PER_MODEL_BYTE * m.model_bytes + m.calibration_bytes + fixed) / 1024)


def describe(m: Measured) -> str:
    lines = [
        f"{MODEL} ({m.parameters / 1e6:.1f} M parameters, {m.model_bytes / 1e6:.1f} MB fp32), "
        f"{m.samples} calibration images, builders {m.builders}: {m.wall_s:.0f} s wall, peak "
        f"RSS {m.peak_rss_kib / 2**20:.2f} GiB (bound {bound_kib(m) / 2**20:.2f} GiB)",
        f"{'step':<16} {'wall s':>8} {'peak RSS MiB':>13}",
    ]
    lines += [
        f"{name:<16} {s['wall_s']:>8.1f} {s['peak_rss_mib']:>13.1f}" for name, s in m.steps.items()
    ]
    lines.append(
        "profile, per variant: "
        + ", ".join(f"{name} {mib:.0f}" for name, mib in m.profile_peaks_mib.items())
    )
    lines.append(f"variants: {', '.join(m.variants)}")
    lines += [f"not built {f['variant']}: {f['reason'][:160]}" for f in m.failures]
    return "\n".join(lines)


def run(quick: bool) -> Outcome:
    from benchmarks.rig import outcome

    m = measure(QUICK_SAMPLES if quick else SAMPLES, runs=QUICK_RUNS if quick else None)
    print(describe(m), end="\n\n", flush=True)
    return outcome(
        NAME,
        TITLE,
        measured=(
            f"{m.wall_s:.0f} s, peak RSS {m.peak_rss_kib / 2**20:.2f} GiB "
            f"({m.samples} calibration images)"
        ),
        baseline=f"fp32 file {m.model_bytes / 1e6:.1f} MB",
        ratio=m.peak_rss_kib * 1024 / m.model_bytes,
        target=(
            f"peak RSS <= {RSS_PER_MODEL_BYTE:g}x the fp32 file + the calibration inputs + "
            f"{RSS_FIXED_GIB:g} GiB"
        ),
        passed=m.peak_rss_kib <= bound_kib(m),
        numbers=dict(m.__dict__),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # the compress child of compress_child
        return child(Path(argv[1]), argv[3:])
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.large_compress", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--samples", type=int, default=SAMPLES, help="calibration images")
    parser.add_argument("--only", help="comma-separated builders (default: all)")
    parser.add_argument("--runs", type=int, help="latency runs per variant (CLI default 200)")
    parser.add_argument(
        "--stages",
        default=",".join(map(str, STAGES)),
        help="bottleneck blocks per stage (default 3,4,6,3: ResNet-50; 3,4,23,3: ResNet-101)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    stages = tuple(int(n) for n in args.stages.split(","))
    m = measure(args.samples, args.only, args.runs, stages)
    print(describe(m))
    if args.json:
        args.json.write_text(json.dumps(m.__dict__, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
