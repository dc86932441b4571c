"""Power meters: one backend module per method, imported only when the chain first needs it.

:data:`METERS` names each method's class; :class:`agent.power.chain.MeterChain` tries them in
the configured order. A backend whose module fails to import counts as unavailable (logged once
by the chain), never as a crash.
"""

from __future__ import annotations

import importlib
from typing import Any

from agent.power.base import MeterUnavailable
from agent.protocol import PowerMethod

__all__ = ["METERS", "meter_class"]

METERS: dict[PowerMethod, str] = {
    PowerMethod.RAPL: "agent.power.rapl:RaplMeter",
    PowerMethod.HWMON: "agent.power.hwmon:HwmonMeter",
    PowerMethod.PMIC: "agent.power.pmic:PmicMeter",
    PowerMethod.NVML: "agent.power.nvml:NvmlMeter",
    PowerMethod.ESTIMATE: "agent.power.estimate:EstimateMeter",
}


def meter_class(method: PowerMethod) -> Any:
    """Import the class for ``method``; MeterUnavailable if its module cannot be imported."""
    module_name, _, class_name = METERS[method].partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except Exception as exc:  # an ImportError, or a module failing while it imports
        raise MeterUnavailable(
            f"cannot import {METERS[method]} ({type(exc).__name__}: {exc})"
        ) from exc
