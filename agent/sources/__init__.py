"""Input sources: where the agent's inference inputs come from; one module per source type.

The table maps a config ``type`` to its class; modules are imported only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

SOURCES: dict[str, str] = {
    "vibration": "agent.sources.simulated:SimulatedVibrationSource",
    "mqtt": "agent.sources.mqtt:MqttSource",
}


def source_class(kind: str) -> Any:
    """The class implementing input source ``kind``."""
    module, _, name = SOURCES[kind].partition(":")
    return getattr(importlib.import_module(module), name)
