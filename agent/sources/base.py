"""What every input source provides: windows of samples with the time they were captured."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import msgspec
import numpy as np

from agent.protocol import FaultKind


class Reading(msgspec.Struct, frozen=True):
    """One window of samples and when it was captured."""

    values: np.ndarray
    ts: datetime


class Source(Protocol):
    """What the inference loop reads from."""

    name: str

    def read(self, timeout: float) -> Reading | None:
        """The next window, or None if nothing arrived within ``timeout`` seconds."""
        ...

    def set_fault(self, fault: FaultKind, severity: float) -> None:
        """Only the simulator supports it; other sources raise NotImplementedError."""
        ...
