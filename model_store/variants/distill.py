"""The distilled student: a much smaller model trained to reproduce the reference's outputs.

The teacher (the fp32 reference) labels the calibration inputs and augmented copies of them
(mixtures of two inputs, a little noise, and gain changes for signals or flips for images), so
the student learns from many more examples than the calibration file holds and never needs
ground-truth labels. The student is a
fixed front end that turns the raw input into a few cheap features, then a small ReLU MLP
(scikit-learn, seeded) regressing the teacher's output, exported to ONNX with the reference's
input and output names, shapes and float32 types. Which front end depends on the input:

* a signal ``[1, N]``: the Hann-windowed power spectrum of the whole window in B bands (log
  energy per band) plus the window mean. The spectrum is exact and full-resolution but cheap:
  one Cooley-Tukey split (N = P x M) computes it from P short M-point DFTs and a twiddle table,
  so the weights grow like N^(4/3) instead of N^2. A coarser spectrum (Welch averaging of short
  segments) was tried first and tracked the teacher worse (r 0.95 vs 0.995 on vibration-ae):
  bearing faults live in fine spectral detail. For vibration-ae, whose size is almost all its
  two 512x160 DFT matrices, this is what makes the student several times smaller.
* an image ``[1, C, H, W]``: a fixed bank of 7x7 filters (two difference-of-Gaussian spot
  detectors, eight oriented line detectors, a blur) at two scales, each response reduced to its
  global max, min and mean square, plus pixel statistics. Global, so position-free: a defect
  may sit anywhere. On surface-cnn an MLP on 4x4-pooled pixels agreed with the teacher on only
  ~82% of images; the filter bank reaches ~95% with a few thousand weights.

The front-end features used for training are computed by running the front-end graph itself in
onnxruntime, so training and the exported student cannot disagree about them.

Targets: an anomaly score that is always positive is learned as its logarithm (scores span
decades; the exported graph ends with Exp); classifier logits are learned centred per sample
(softmax does not see a per-sample offset), the high-temperature limit of soft-target
distillation; probabilities are learned as centred log-probabilities and the student ends with
Softmax. The calibration inputs are split once more: the last HOLDOUT_SHARE never trains the
student and the reported fidelity (Pearson r of outputs, argmax agreement for classifiers, alarm
agreement for anomaly scores, at the reference's cut-off from :func:`rules.reference_cutoff`)
comes from running the exported ONNX file on that part.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.protocol import ModelFormat, Task
from model_store.variants.base import BuildContext, BuiltVariant, VariantError
from model_store.variants.reference import (
    calibration_inputs,
    file_size,
    load_reference,
    run_outputs,
    session,
)
from model_store.variants.rules import reference_cutoff

VARIANT = "student"
OPSET = 17
IR_VERSION = 8  # what opset 17 came with; older runtimes load the student too
SEED = 20240611
MIN_SAMPLES = 20  # fewer calibration inputs than this cannot both train and judge a student
HOLDOUT_SHARE = 0.25  # of the building calibration part, kept for the fidelity report
AUGMENT_FACTOR = 20  # teacher-labelled augmented inputs per calibration input used for training
MAX_TRAINING = 12000  # cap on training samples, which bounds the build time
# Augmented inputs are made, labelled and turned into features this many bytes (of float64
# working arrays; making a chunk briefly needs about five times that) at a time, never all at
# once: 12,000 ResNet-50 inputs (3x224x224) would be 7.2 GB as float32, twice that being made.
CHUNK_BYTES = 16 * 2**20
SIGNAL_BANDS = 32
FILTER_RADIUS = 3  # image filters are 7x7
LINE_DIRECTIONS = 8
IMAGE_LEVELS = 2  # the full image and a 2x2-averaged copy


@dataclass
class _Graph:
    """A growing ONNX graph: nodes and initializers with unique names."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    count: int = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.count += 1
        unique = f"{name}_{self.count}"
        self.initializers.append(numpy_helper.from_array(value, unique))
        return unique

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        self.count += 1
        output = out or f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attrs))
        return output

    def shape(self, dims: list[int]) -> str:
        return self.const("shape", np.array(dims, dtype=np.int64))


@dataclass(frozen=True)
class _SignalFrontEnd:
    """Log band energies of the Hann-windowed DFT of a length-N window, plus its mean."""

    n: int
    p: int  # decimation of the Cooley-Tukey split; 1 means a direct DFT
    m: int  # length of the short DFTs
    bands: int
    eps: float
    hidden: tuple[int, ...] = (32, 16)

    @staticmethod
    def plan(n: int) -> tuple[int, int]:
        """The split N = P x M with the fewest weights (2 M^2 + P N); (1, N) if there is none."""
        best = (1, n)
        best_cost = float(n * (n // 2) * 2)
        for m in range(2, n):
            p = n // m
            if n % m or (n // 2) % m or p < 2:
                continue
            cost = 2.0 * m * m + p * n
            if cost < best_cost:
                best, best_cost = (p, m), cost
        return best

    @classmethod
    def fit(cls, chunks: Iterable[np.ndarray]) -> _SignalFrontEnd:
        """The front end for the training inputs, given as ``[n, N]`` chunks in order."""
        chunks = iter(chunks)
        first = next(chunks)
        n = first.shape[1]
        if n < 8:
            raise VariantError(VARIANT, f"a signal of {n} samples is too short for a spectrum")
        p, m = cls.plan(n)
        bins = n // 2
        bands = max(b for b in range(1, min(SIGNAL_BANDS, bins) + 1) if bins % b == 0)
        # The log floor scales with the data (volts or millivolts alike): a millionth of the
        # mean band energy, which by Parseval is N * sum((hann * x)^2) / 2 spread over the bands.
        hann = np.hanning(n + 1)[:n]
        per_input = [
            np.sum((chunk.astype(np.float64) * hann) ** 2, axis=1)
            for chunk in itertools.chain([first], chunks)
        ]
        energy = float(np.mean(np.concatenate(per_input)))
        eps = max(1e-6 * n * energy / (2 * bands), 1e-30)
        return cls(n, p, m, bands, eps)

    def _tables(self) -> dict[str, np.ndarray]:
        n, p, m = self.n, self.p, self.m
        hann = np.hanning(n + 1)[:n]  # periodic Hann, as spectral analysis uses
        kc = m if p > 1 else n // 2
        angle = 2 * np.pi * np.outer(np.arange(m), np.arange(kc)) / m
        tables = {
            "hann": hann.reshape(1, n),
            "cos": np.cos(angle),
            "sin": np.sin(angle),
            "mask": np.r_[0.0, np.ones(n // 2 - 1)].reshape(1, n // 2),  # drop DC
        }
        if p > 1:
            q = (n // 2) // m
            k = np.arange(q)[:, None] * m + np.arange(m)[None, :]  # output bin of (q, k')
            twiddle = 2 * np.pi * np.arange(p)[:, None, None] * k[None] / n
            tables["tw_cos"] = np.cos(twiddle)
            tables["tw_sin"] = np.sin(twiddle)
        return {name: value.astype(np.float32) for name, value in tables.items()}

    def onnx(self, g: _Graph, source: str) -> str:
        t = self._tables()
        n, p, m = self.n, self.p, self.m
        flat = g.op("Reshape", source, g.shape([1, n]))
        x = g.op("Mul", flat, g.const("hann", t["hann"]))
        if p > 1:
            # Row r holds the decimated sequence x[r], x[r + P], ...; its M-point DFT, turned
            # by the twiddle factors and summed over r, gives bin q * M + k' of the full DFT.
            rows = g.op("Transpose", g.op("Reshape", x, g.shape([m, p])), perm=[1, 0])
            c = g.op("MatMul", rows, g.const("dft_cos", t["cos"]))
            s = g.op("MatMul", rows, g.const("dft_sin", t["sin"]))
            c, s = g.op("Reshape", c, g.shape([p, 1, m])), g.op("Reshape", s, g.shape([p, 1, m]))
            tc, ts = g.const("twiddle_cos", t["tw_cos"]), g.const("twiddle_sin", t["tw_sin"])
            axis0 = g.const("axes", np.array([0], dtype=np.int64))
            re = g.op("ReduceSum", g.op("Sub", g.op("Mul", c, tc), g.op("Mul", s, ts)), axis0)
            im = g.op("ReduceSum", g.op("Add", g.op("Mul", c, ts), g.op("Mul", s, tc)), axis0)
            re = g.op("Reshape", re, g.shape([1, n // 2]))
            im = g.op("Reshape", im, g.shape([1, n // 2]))
        else:
            re = g.op("MatMul", x, g.const("dft_cos", t["cos"]))
            im = g.op("MatMul", x, g.const("dft_sin", t["sin"]))
        power = g.op("Add", g.op("Mul", re, re), g.op("Mul", im, im))
        power = g.op("Mul", power, g.const("no_dc", t["mask"]))
        grouped = g.op("Reshape", power, g.shape([1, self.bands, (n // 2) // self.bands]))
        axis2 = g.const("axes", np.array([2], dtype=np.int64))
        band = g.op("ReduceSum", grouped, axis2, keepdims=0)
        eps = g.const("log_eps", np.array([self.eps], dtype=np.float32))
        logs = g.op("Log", g.op("Add", band, eps))
        mean = g.op("ReduceMean", flat, axes=[1], keepdims=1)
        return g.op("Concat", logs, mean, axis=1)

    def describe(self) -> dict[str, Any]:
        return {
            "front_end": "signal-spectrum",
            "window": self.n,
            "split": [self.p, self.m],
            "bands": self.bands,
            "bins_per_band": (self.n // 2) // self.bands,
            "extra_features": ["mean"],
        }


def _gaussian(sigma: float, radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    g = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    kernel: np.ndarray = g / g.sum()
    return kernel


def filter_bank(radius: int = FILTER_RADIUS) -> np.ndarray:
    """Fixed 2-D filters ``[F, 1, k, k]``: two spot detectors, eight line detectors, a blur.

    Spots are differences of Gaussians (small pits, larger blotches); lines are second
    derivatives of a Gaussian across one of eight directions, smoothed along it (scratches of
    any angle, bright or dark by the sign of the response).
    """
    filters = [_gaussian(s1, radius) - _gaussian(s2, radius) for s1, s2 in ((0.8, 2.0), (1.5, 3.5))]
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1].astype(np.float64)
    for angle in np.arange(LINE_DIRECTIONS) * np.pi / LINE_DIRECTIONS:
        across = -np.sin(angle) * x + np.cos(angle) * y
        along = np.cos(angle) * x + np.sin(angle) * y
        ridge = (1 - across**2) * np.exp(-(across**2) / 2) * np.exp(-(along**2) / (2 * 3.0**2))
        ridge -= ridge.mean()
        filters.append(ridge / np.abs(ridge).sum())
    filters.append(_gaussian(2.5, radius))
    return np.stack(filters)[:, None].astype(np.float32)


@dataclass(frozen=True)
class _ImageFrontEnd:
    """Global statistics of a fixed filter bank's responses, at two scales, plus pixel stats.

    Position-free on purpose: a defect may sit anywhere in the patch. Channels are averaged.
    """

    channels: int
    levels: int
    hidden: tuple[int, ...] = (24,)

    @classmethod
    def fit(cls, sample_shape: tuple[int, ...]) -> _ImageFrontEnd:
        c, h, w = sample_shape
        size = 2 * FILTER_RADIUS + 1
        if min(h, w) < size:
            raise VariantError(
                VARIANT, f"images of {h}x{w} are smaller than the {size}x{size} filters"
            )
        return cls(c, IMAGE_LEVELS if min(h, w) >= 2 * size else 1)

    def onnx(self, g: _Graph, source: str) -> str:
        image = source
        if self.channels > 1:
            image = g.op("ReduceMean", source, axes=[1], keepdims=1)
        spatial: dict[str, Any] = {"axes": [2, 3], "keepdims": 0}
        negated = g.op("Neg", image)
        parts = [
            g.op("ReduceMean", image, **spatial),
            g.op("ReduceMean", g.op("Mul", image, image), **spatial),
            g.op("ReduceMax", image, **spatial),
            g.op("Neg", g.op("ReduceMax", negated, **spatial)),
        ]
        bank = g.const("filter_bank", filter_bank())
        for level in range(self.levels):
            if level:
                image = g.op("AveragePool", image, kernel_shape=[2, 2], strides=[2, 2])
            response = g.op("Conv", image, bank)
            parts += [
                g.op("ReduceMax", response, **spatial),
                g.op("Neg", g.op("ReduceMax", g.op("Neg", response), **spatial)),
                g.op("ReduceMean", g.op("Mul", response, response), **spatial),
            ]
        return g.op("Concat", *parts, axis=1)

    def describe(self) -> dict[str, Any]:
        return {
            "front_end": "image-filter-bank",
            "filters": int(filter_bank().shape[0]),
            "filter_size": 2 * FILTER_RADIUS + 1,
            "scales": self.levels,
            "statistics": ["max", "min", "mean square"],
            "extra_features": ["mean", "mean square", "max", "min"],
        }


_FrontEnd = _SignalFrontEnd | _ImageFrontEnd


def _front_end(sample_shape: tuple[int, ...], training: _TrainingSet) -> _FrontEnd:
    if len(sample_shape) == 1:
        return _SignalFrontEnd.fit(training.chunks())
    if len(sample_shape) == 3:
        return _ImageFrontEnd.fit(sample_shape)
    raise VariantError(
        VARIANT,
        f"no student design for inputs shaped [1, {', '.join(map(str, sample_shape))}]: "
        "distillation handles signals [1, N] and images [1, C, H, W]",
    )


def _features(ctx: BuildContext, front: _FrontEnd, chunks: Iterable[np.ndarray]) -> np.ndarray:
    """The front end's features, computed by the very graph the student will contain."""
    g = _Graph()
    out = g.op("Identity", front.onnx(g, ctx.info.input_name), out="features")
    shape = [1, *ctx.info.sample_shape]
    graph = helper.make_graph(
        g.nodes,
        "front-end",
        [helper.make_tensor_value_info(ctx.info.input_name, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    sess = session(model.SerializeToString(), VARIANT)
    name = ctx.info.input_name
    rows = [
        sess.run([out], {name: chunk[i : i + 1]})[0] for chunk in chunks for i in range(len(chunk))
    ]
    return np.concatenate(rows).astype(np.float64)


@dataclass(frozen=True)
class _Target:
    """How teacher outputs become regression targets, and how the student undoes it."""

    kind: str  # "log", "centred-logits", "centred-log-probs" or "identity"

    @classmethod
    def choose(cls, task: Task, teacher: np.ndarray) -> _Target:
        if task is Task.ANOMALY and np.all(teacher > 0):
            return cls("log")
        if task is Task.CLASSIFICATION and teacher.shape[1] > 1:
            sums = teacher.sum(axis=1)
            if np.all((teacher >= 0) & (teacher <= 1)) and np.allclose(sums, 1.0, atol=1e-3):
                return cls("centred-log-probs")
            return cls("centred-logits")
        return cls("identity")

    def encode(self, teacher: np.ndarray) -> np.ndarray:
        values = np.asarray(teacher, dtype=np.float64)
        if self.kind == "log":
            values = np.log(values)
        if self.kind == "centred-log-probs":
            values = np.log(np.clip(values, 1e-7, None))
        if self.kind in ("centred-logits", "centred-log-probs"):
            values = values - values.mean(axis=1, keepdims=True)
        return values

    def onnx(self, g: _Graph, value: str) -> str:
        if self.kind == "log":
            return g.op("Exp", value)
        if self.kind == "centred-log-probs":
            return g.op("Softmax", value, axis=-1)
        return value


def _fit_mlp(
    features: np.ndarray, targets: np.ndarray, hidden: tuple[int, ...]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A ReLU MLP regressing standardized targets on standardized features; weights folded.

    The standardization of features and targets is folded into the first and last layers, so
    the exported graph is plain MatMul/Add/Relu.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor
    from threadpoolctl import threadpool_limits

    mu, sd = features.mean(axis=0), np.maximum(features.std(axis=0), 1e-6)
    y_mu, y_sd = targets.mean(axis=0), np.maximum(targets.std(axis=0), 1e-6)
    net = MLPRegressor(
        hidden_layer_sizes=hidden,
        activation="relu",
        solver="adam",
        alpha=1e-4,
        batch_size=128,
        learning_rate_init=2e-3,
        max_iter=400,
        tol=1e-6,
        n_iter_no_change=20,
        random_state=SEED,
    )
    # One BLAS thread: a multi-threaded product may sum in another order, and hundreds of Adam
    # steps amplify the last bit; so the same inputs give the same student on any machine.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        scaled = (targets - y_mu) / y_sd
        # A single target goes in as a vector: scikit-learn warns about a one-column matrix.
        net.fit((features - mu) / sd, scaled[:, 0] if scaled.shape[1] == 1 else scaled)
    layers = [
        (np.asarray(w, np.float64), np.asarray(b, np.float64))
        for w, b in zip(net.coefs_, net.intercepts_, strict=True)
    ]
    w0, b0 = layers[0]
    layers[0] = (w0 / sd[:, None], b0 - (mu / sd) @ w0)
    wl, bl = layers[-1]
    layers[-1] = (wl * y_sd[None, :], bl * y_sd + y_mu)
    return [(w.astype(np.float32), b.astype(np.float32)) for w, b in layers]


class _TrainingSet:
    """What the student trains on: the calibration inputs it may use, then ``extra`` augmented
    ones (:func:`_augmented`), made again, chunk by chunk, each time they are read. Labelling,
    fitting the front end and computing features each read them once; holding them instead
    would cost ``len(self)`` inputs, up to MAX_TRAINING, at once."""

    def __init__(self, own: np.ndarray, extra: int) -> None:
        self.own = own
        self.extra = extra
        per_input = 8 * int(np.prod(own.shape[1:]))  # float64 while being made
        self.chunk = max(1, CHUNK_BYTES // per_input)

    def __len__(self) -> int:
        return len(self.own) + self.extra

    def chunks(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.own), self.chunk):
            yield self.own[start : start + self.chunk]
        if self.extra:
            yield from _augmented(self.own, self.extra, np.random.default_rng(SEED), self.chunk)


def _augmented(
    inputs: np.ndarray, count: int, rng: np.random.Generator, chunk: int
) -> Iterator[np.ndarray]:
    """``count`` new inputs, ``chunk`` at a time: mixtures of two calibration inputs, rescaled,
    with a little noise.

    Mixing makes inputs between the calibration points (between healthy and faulty, between
    classes), which is where a student learns the teacher's boundaries; images are also
    flipped, since a surface defect has no preferred orientation in a crop. The random draws
    are those of making all ``count`` at once, in the same order, whatever ``chunk`` is: the
    per-input noise levels come after all the noise, so the noise is drawn twice, once to pass
    over it and once, from a copy of the generator, to use.
    """
    first = rng.integers(len(inputs), size=count)
    second = rng.integers(len(inputs), size=count)
    shape = (count,) + (1,) * (inputs.ndim - 1)
    mix = rng.uniform(0.0, 1.0, size=shape)
    if inputs.ndim == 4:
        flip_h = rng.random(count) < 0.5
        flip_v = rng.random(count) < 0.5
    else:
        gain = np.exp(rng.uniform(np.log(0.8), np.log(1.25), size=shape))
    scale = float(np.std(inputs)) or 1.0
    noise = copy.deepcopy(rng)
    spans = [slice(start, min(start + chunk, count)) for start in range(0, count, chunk)]
    for span in spans:
        rng.standard_normal((span.stop - span.start, *inputs.shape[1:]))
    level = rng.uniform(0.0, 0.03, size=shape)
    for span in spans:
        out = mix[span] * inputs[first[span]] + (1 - mix[span]) * inputs[second[span]]
        if inputs.ndim == 4:
            flip = flip_h[span]
            out[flip] = out[flip, :, :, ::-1]
            flip = flip_v[span]
            out[flip] = out[flip, :, ::-1, :]
        else:
            out *= gain[span]
        out += noise.standard_normal(out.shape) * level[span] * scale
        yield out.astype(np.float32)


def _student_model(
    ctx: BuildContext,
    front: _FrontEnd,
    layers: list[tuple[np.ndarray, np.ndarray]],
    target: _Target,
    output_shape: tuple[int, ...],
) -> onnx.ModelProto:
    g = _Graph()
    h = front.onnx(g, ctx.info.input_name)
    for i, (w, b) in enumerate(layers):
        h = g.op("Add", g.op("MatMul", h, g.const(f"w{i}", w)), g.const(f"b{i}", b))
        if i < len(layers) - 1:
            h = g.op("Relu", h)
    h = target.onnx(g, h)
    output = ctx.info.output_names[0]
    g.op("Reshape", h, g.shape(list(output_shape)), out=output)
    graph = helper.make_graph(
        g.nodes,
        f"{ctx.info.name}-student",
        [
            helper.make_tensor_value_info(
                ctx.info.input_name, TensorProto.FLOAT, [1, *ctx.info.sample_shape]
            )
        ],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, list(output_shape))],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="greenfleet.model_store.variants.distill",
        doc_string=f"Distilled student of {ctx.info.name}:{ctx.info.version}",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _fidelity(
    task: Task, teacher: np.ndarray, student: np.ndarray, alarm_threshold: float
) -> dict[str, Any]:
    """How closely the student follows the teacher on held-out inputs."""
    count = len(teacher)
    flat_t, flat_s = teacher.reshape(count, -1), student.reshape(count, -1)
    result: dict[str, Any] = {"heldout_samples": count}
    if task is Task.CLASSIFICATION and flat_t.shape[1] > 1:
        # A per-sample offset of the logits changes nothing downstream: compare centred values.
        flat_t = flat_t - flat_t.mean(axis=1, keepdims=True)
        flat_s = flat_s - flat_s.mean(axis=1, keepdims=True)
        result["agreement"] = float(np.mean(flat_t.argmax(axis=1) == flat_s.argmax(axis=1)))
    elif task is Task.ANOMALY:
        result["alarm_threshold"] = alarm_threshold
        alarms_t, alarms_s = flat_t[:, 0] > alarm_threshold, flat_s[:, 0] > alarm_threshold
        result["agreement"] = float(np.mean(alarms_t == alarms_s))
    result["correlation"] = _pearson(flat_t, flat_s)
    result["max_abs_error"] = float(np.max(np.abs(flat_t - flat_s)))
    return result


def _building_inputs(ctx: BuildContext) -> np.ndarray:
    inputs = calibration_inputs(ctx, VARIANT, MIN_SAMPLES)
    if not np.all(np.isfinite(inputs)):
        raise VariantError(VARIANT, "calibration inputs contain NaN or infinite values")
    return inputs


class DistillBuilder:
    """A small student trained on the reference's outputs (see the module docstring)."""

    name = "distill"
    needs_calibration = True

    def build(self, ctx: BuildContext) -> list[BuiltVariant]:
        inputs = _building_inputs(ctx)
        if len(ctx.info.output_names) != 1:
            raise VariantError(
                VARIANT,
                f"the student reproduces one output; the model has {len(ctx.info.output_names)} "
                f"({', '.join(ctx.info.output_names)})",
            )
        load_reference(ctx, VARIANT)
        started = time.monotonic()
        cut = len(inputs) - max(1, math.ceil(len(inputs) * HOLDOUT_SHARE))
        own, heldout = inputs[:cut], inputs[cut:]
        extra = min(AUGMENT_FACTOR * len(own), max(0, MAX_TRAINING - len(own)))
        training = _TrainingSet(own, extra)
        teacher = run_outputs(ctx.reference, ctx, training.chunks(), VARIANT)[0]
        # Outputs of one input each are stacked on axis 0: one row is the model's output shape.
        output_shape = tuple(int(d) for d in teacher[:1].shape)
        teacher = teacher.reshape(len(training), -1).astype(np.float64)

        front = _front_end(ctx.info.sample_shape, training)
        target = _Target.choose(ctx.info.task, teacher)
        features = _features(ctx, front, training.chunks())
        layers = _fit_mlp(features, target.encode(teacher), front.hidden)
        model = _student_model(ctx, front, layers, target, output_shape)
        path = ctx.workdir / "student.onnx"
        onnx.save(model, str(path))
        seconds = time.monotonic() - started

        teacher_held = run_outputs(ctx.reference, ctx, heldout, VARIANT)[0]
        student_held = run_outputs(path, ctx, heldout, VARIANT)[0]
        if not np.all(np.isfinite(student_held)):
            raise VariantError(VARIANT, "the trained student produces NaN or infinite outputs")
        alarm = 0.0
        if ctx.info.task is Task.ANOMALY:
            labels = ctx.calibration.labels if ctx.calibration is not None else None
            own_labels = None if labels is None else labels[:cut]
            alarm, _, _ = reference_cutoff(teacher[: len(own), 0], own_labels)
        fidelity = _fidelity(ctx.info.task, teacher_held, student_held, alarm)
        before, after = file_size(ctx.reference), file_size(path)
        ratio = before / after
        architecture = {
            **front.describe(),
            "features": int(layers[0][0].shape[0]),
            "hidden": list(front.hidden),
            "target": target.kind,
            "parameters": int(sum(w.size + b.size for w, b in layers)),
        }
        return [
            BuiltVariant(
                variant=VARIANT,
                path=path,
                format=ModelFormat.ONNX,
                precision="fp32",
                technique="distill",
                notes=tuple(
                    _notes(architecture, fidelity, before, after, len(own), extra, seconds)
                ),
                details={
                    "student": architecture,
                    "size_bytes": after,
                    "reference_bytes": before,
                    "size_ratio": ratio,
                    "training_samples": len(training),
                    "calibration_used": len(own),
                    "augmented": extra,
                    "seed": SEED,
                    "seconds": round(seconds, 2),
                    **fidelity,
                },
            )
        ]


def _notes(
    architecture: dict[str, Any],
    fidelity: dict[str, Any],
    before: int,
    after: int,
    own: int,
    extra: int,
    seconds: float,
) -> list[str]:
    hidden = "-".join(str(h) for h in architecture["hidden"])
    notes = [
        f"student: {architecture['front_end']} front end, {architecture['features']} features, "
        f"ReLU MLP {hidden}, trained on {own} calibration + {extra} augmented inputs labelled "
        f"by the reference ({seconds:.1f} s)",
        f"file {after} bytes vs {before} ({before / after:.1f}x smaller)",
    ]
    r, agreement = fidelity.get("correlation"), fidelity.get("agreement")
    judged = f"on {fidelity['heldout_samples']} held-out calibration inputs"
    parts = [f"Pearson r {r:.4f}" if r is not None else "Pearson r undefined (constant outputs)"]
    if agreement is not None:
        what = "argmax" if "alarm_threshold" not in fidelity else "alarm decisions"
        parts.append(f"{what} agree {agreement:.1%}")
    notes.append(f"fidelity {judged}: {', '.join(parts)}")
    if fidelity["heldout_samples"] < 30:
        notes.append("few held-out inputs: the fidelity figures are rough")
    if before / after < 4:
        notes.append(f"only {before / after:.1f}x smaller than the reference")
    return notes
