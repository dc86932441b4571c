"""Inference runtimes: one backend module per model format, imported only when first needed.

A backend whose runtime is not installed is logged once and left out of
:func:`available_formats`; loading a model of that format raises :class:`ModelLoadError`
naming the pip extra to install.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class _Probe:
    loaders: dict[ModelFormat, Any]
    failures: dict[ModelFormat, str]


@functools.cache
def _probe() -> _Probe:
    """Import every backend once; remember the classes that import and why the others don't."""
    loaders: dict[ModelFormat, Any] = {}
    failures: dict[ModelFormat, str] = {}
    for fmt, target in BACKENDS.items():
        module_name, _, class_name = target.partition(":")
        try:
            loaders[fmt] = getattr(importlib.import_module(module_name), class_name)
        except Exception as exc:  # an ImportError, or a runtime that fails while importing
            failures[fmt] = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "%s models are disabled: cannot import %s (%s); install with pip install '%s'",
                fmt.value,
                target,
                failures[fmt],
                EXTRAS.get(fmt, "greenfleet[agent]"),
            )
    return _Probe(loaders, failures)


def available_formats() -> list[ModelFormat]:
    """The formats whose backend imports on this host, in :data:`BACKENDS` order."""
    return list(_probe().loaders)


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
    loader = probe.loaders.get(fmt)
    if loader is None:
        reason = probe.failures.get(fmt, "no backend is registered for it")
        raise ModelLoadError(
            f"cannot load {path}: the {fmt.value} runtime is not available on this device "
            f"({reason}); install it with pip install '{EXTRAS.get(fmt, 'greenfleet[agent]')}'"
        )
    model: LoadedModel = loader.load(Path(path), threads=threads)
    return model
