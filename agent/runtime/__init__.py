"""Inference runtimes: one backend module per model format, imported only when first needed.

A backend whose runtime is not installed is logged once and left out of
:func:`available_formats`; loading a model of that format raises :class:`ModelLoadError`
naming the pip extra to install.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import msgspec

from agent.protocol import ModelFormat
from agent.runtime.base import (
    InferenceError,
    LoadedModel,
    ModelLoadError,
    ModelRuntimeError,
    TensorSpec,
)

__all__ = [
    "BACKENDS",
    "InferenceError",
    "LoadedModel",
    "ModelLoadError",
    "ModelRuntimeError",
    "TensorSpec",
    "available_formats",
    "format_for",
    "load_model",
]

logger = logging.getLogger(__name__)

BACKENDS: dict[ModelFormat, str] = {
    ModelFormat.ONNX: "agent.runtime.onnx:OnnxModel",
    ModelFormat.TFLITE: "agent.runtime.tflite:TfliteModel",
}

# The pip extra of the greenfleet package that installs each backend's runtime.
EXTRAS: dict[ModelFormat, str] = {
    ModelFormat.ONNX: "greenfleet[agent]",
    ModelFormat.TFLITE: "greenfleet[tflite]",
}

_SUFFIXES = {".onnx": ModelFormat.ONNX, ".tflite": ModelFormat.TFLITE}


# The runtime packages each backend can use; their presence is checked without importing them,
# because importing LiteRT costs an ONNX-only agent about 8 MiB of memory.
REQUIRES: dict[ModelFormat, tuple[str, ...]] = {
    ModelFormat.ONNX: ("onnxruntime",),
    ModelFormat.TFLITE: ("ai_edge_litert", "tflite_runtime"),
}


class _Probe(msgspec.Struct, frozen=True):
    available: tuple[ModelFormat, ...]
    failures: dict[ModelFormat, str]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _probe() -> _Probe:
    """Find the backends whose module and runtime are installed, without importing them."""
    available: list[ModelFormat] = []
    failures: dict[ModelFormat, str] = {}
    for fmt, target in BACKENDS.items():
        module_name = target.partition(":")[0]
        runtimes = REQUIRES.get(fmt, ())
        if not _installed(module_name):
            failures[fmt] = f"backend module {module_name} not found"
        elif runtimes and not any(_installed(r) for r in runtimes):
            failures[fmt] = f"none of {', '.join(runtimes)} is installed"
        else:
            available.append(fmt)
            continue
        logger.warning(
            "%s models are disabled: %s; install with pip install '%s'",
            fmt.value,
            failures[fmt],
            EXTRAS.get(fmt, "greenfleet[agent]"),
        )
    return _Probe(tuple(available), failures)


@functools.cache
def _loader(fmt: ModelFormat) -> Any:
    """Import the backend class for ``fmt`` on first use; ModelLoadError if that fails."""
    target = BACKENDS[fmt]
    module_name, _, class_name = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except Exception as exc:  # an ImportError, or a runtime that fails while importing
        logger.warning("%s models are disabled: cannot import %s (%s)", fmt.value, target, exc)
        raise ModelLoadError(
            f"the {fmt.value} runtime failed to import ({type(exc).__name__}: {exc}); "
            f"reinstall it with pip install '{EXTRAS.get(fmt, 'greenfleet[agent]')}'"
        ) from exc


def available_formats() -> list[ModelFormat]:
    """The formats whose backend and runtime are installed here, in :data:`BACKENDS` order."""
    return list(_probe().available)


def format_for(path: Path) -> ModelFormat:
    """The format of a model file, by its suffix."""
    try:
        return _SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise ModelLoadError(
            f"cannot tell the model format of {path}: expected a file ending in "
            f"{' or '.join(_SUFFIXES)}"
        ) from None


def load_model(path: Path, fmt: ModelFormat, *, threads: int = 1) -> LoadedModel:
    """Load ``path`` with the backend for ``fmt`` on ``threads`` CPU threads."""
    probe = _probe()
    if fmt not in probe.available:
        reason = probe.failures.get(fmt, "no backend is registered for it")
        raise ModelLoadError(
            f"cannot load {path}: the {fmt.value} runtime is not available on this device "
            f"({reason}); install it with pip install '{EXTRAS.get(fmt, 'greenfleet[agent]')}'"
        )
    try:
        loader = _loader(fmt)
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    model: LoadedModel = loader.load(Path(path), threads=threads)
    return model
