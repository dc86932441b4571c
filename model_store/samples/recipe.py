"""What every sample-model build script shares: file entries for its metadata, and its CLI.

The scripts must stay runnable in a TensorFlow-only environment, so this imports only stdlib.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


def file_entry(path: Path) -> dict[str, Any]:
    """How a metadata JSON names a built file: name, size and sha256."""
    data = path.read_bytes()
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def command_line(
    prog: str,
    doc: str,
    default_out: Path,
    build: Callable[[Path, bool], Any],
    argv: list[str] | None = None,
) -> int:
    """``python -m PROG [--out DIR] [--tflite]``: run ``build(out, with_tflite)``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out, help="output directory")
    parser.add_argument(
        "--tflite", action="store_true", help="also write the TFLite model (needs TensorFlow)"
    )
    args = parser.parse_args(argv)
    build(args.out, args.tflite)
    return 0
