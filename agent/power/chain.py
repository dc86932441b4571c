"""The configured power meters, tried in order: the first that works measures, the rest wait.

``start()`` builds and starts each meter in ``PowerConfig.meters`` order and keeps those that
start; the estimate is always the last of them and never fails. ``read()`` asks the first one.
When it fails mid-run (:class:`MeterError`) the chain drops it for the rest of the session,
re-baselines the next one and returns that one's reading with a ``note`` saying what happened
("rapl failed (...); fell back to estimate"). A window a meter cannot measure
(:class:`WindowSkipped`, e.g. a counter reset) is reported from the estimate with a note, and
the meter is kept, unless it skips :data:`MAX_SKIPS` windows in a row.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Literal

import msgspec

from agent.config import PowerConfig
from agent.power import meter_class
from agent.power.base import Meter, MeterError, MeterUnavailable, PowerReading, WindowSkipped
from agent.power.estimate import EstimateMeter
from agent.protocol import PowerMethod

log = logging.getLogger(__name__)

MAX_SKIPS = 3  # windows in a row a meter may fail to measure before it is dropped

MeterState = Literal["active", "standby", "unavailable", "failed"]


class MeterStatus(msgspec.Struct, frozen=True):
    """One configured meter: whether it measures, waits, cannot work here, or failed mid-run."""

    method: PowerMethod
    state: MeterState
    reason: str | None = None
    hint: str | None = None

    def as_dict(self) -> dict[str, str]:
        """For a birth message or a diagnostics reply."""
        fields = {"method": self.method.value, "state": self.state}
        fields |= {k: v for k, v in (("reason", self.reason), ("hint", self.hint)) if v}
        return fields


def build_meter(method: PowerMethod, config: PowerConfig) -> Meter:
    """A meter of ``method`` set up from ``config`` (no I/O); MeterUnavailable if not importable."""
    cls = meter_class(method)
    idle_w = config.idle_for(method)
    meter: Meter
    if method is PowerMethod.RAPL:
        meter = cls(config.rapl_root, idle_w=idle_w)
    elif method is PowerMethod.HWMON:
        meter = cls(config.hwmon_root, config.hwmon_rails, idle_w=idle_w)
    elif method is PowerMethod.PMIC:
        meter = cls(command=config.vcgencmd, idle_w=idle_w)
    elif method is PowerMethod.NVML:
        meter = cls(idle_w=idle_w)
    else:
        meter = cls(config.idle_w, config.active_w_per_core)
    return meter


class MeterChain:
    """Power readings from the first working meter of the configured list (module docstring)."""

    def __init__(
        self,
        config: PowerConfig,
        build: Callable[[PowerMethod, PowerConfig], Meter] = build_meter,
    ) -> None:
        self.config = config
        self._build = build
        self.estimate = EstimateMeter(config.idle_w, config.active_w_per_core)
        order = list(config.meters)
        if PowerMethod.ESTIMATE not in order:
            order.append(PowerMethod.ESTIMATE)
        self.order = order[: order.index(PowerMethod.ESTIMATE) + 1]  # it never fails
        self._lock = threading.Lock()
        self._candidates: list[tuple[PowerMethod, Meter]] = [(PowerMethod.ESTIMATE, self.estimate)]
        self._out: dict[PowerMethod, MeterStatus] = {}
        self._skips = 0

    @property
    def active_method(self) -> PowerMethod:
        """The method of the meter that measures the next window."""
        return self._candidates[0][0]

    def status(self) -> list[MeterStatus]:
        """Every configured meter in order, with its state and, if it is out, why."""
        with self._lock:
            waiting = dict(self._candidates)
            out = dict(self._out)
        result = []
        for method in self.order:
            if method in waiting:
                state: MeterState = "active" if method is self.active_method else "standby"
                result.append(MeterStatus(method, state))
            elif method in out:
                result.append(out[method])
        return result

    def start(self) -> None:
        """Build and start every configured meter; log, once each, why any cannot work here."""
        candidates: list[tuple[PowerMethod, Meter]] = []
        out: dict[PowerMethod, MeterStatus] = {}
        for method in self.order:
            if method is PowerMethod.ESTIMATE:
                candidates.append((method, self.estimate))
                break
            try:
                meter = self._build(method, self.config)
                meter.start()
            except MeterUnavailable as exc:
                out[method] = MeterStatus(method, "unavailable", exc.reason, exc.hint)
                continue
            except Exception as exc:  # a backend bug must not stop the agent
                log.warning("power meter %s crashed while starting", method.value, exc_info=True)
                out[method] = MeterStatus(
                    method, "unavailable", f"{type(exc).__name__}: {exc}", None
                )
                continue
            candidates.append((method, meter))
        with self._lock:
            self._candidates = candidates
            self._out = out
            self._skips = 0
        measuring = self.active_method is not PowerMethod.ESTIMATE
        for status in out.values():
            log.log(
                logging.INFO if measuring else logging.WARNING,
                "power meter %s unavailable: %s%s",
                status.method.value,
                status.reason,
                f" (hint: {status.hint})" if status.hint else "",
            )
        if measuring:
            log.info("power measured with %s", self.active_method.value)
        else:
            log.warning("no power meter can be read here; reporting the labelled estimate")

    def read(
        self, window_s: float, process_cpu_s: float, inference_cpu_s: float, inferences: int
    ) -> PowerReading:
        """The window's reading from the first working meter; a note says if it fell back."""
        args = (window_s, process_cpu_s, inference_cpu_s, inferences)
        notes: list[str] = []
        while True:
            method, meter = self._candidates[0]
            if method is PowerMethod.ESTIMATE:
                reading = self.estimate.read(*args)
                break
            try:
                reading = meter.read(*args)
            except WindowSkipped as exc:
                self._skips += 1
                if self._skips < MAX_SKIPS:
                    notes.append(f"{method.value} skipped this window ({exc})")
                    reading = self.estimate.read(*args)
                    break
                notes += self._drop(f"{exc}; {self._skips} windows in a row", None)
            except MeterError as exc:
                notes += self._drop(str(exc), None)
            except Exception as exc:  # a backend bug: degrade like a failure, keep the trace
                notes += self._drop(f"{type(exc).__name__}: {exc}", exc)
            else:
                self._skips = 0
                break
        if notes:
            if reading.note:
                notes.append(reading.note)
            notes.append(f"fell back to {reading.method.value}")
            reading = msgspec.structs.replace(reading, note="; ".join(notes))
        return reading

    def _drop(self, reason: str, exc: BaseException | None) -> list[str]:
        """Take the active meter out for good and re-baseline the next; notes on what happened."""
        method, _ = self._candidates[0]
        notes = [f"{method.value} failed ({reason})"]
        with self._lock:
            self._candidates = self._candidates[1:]
            self._out[method] = MeterStatus(method, "failed", reason)
            self._skips = 0
        log.warning(
            "power meter %s failed mid-run (%s); falling back to %s",
            method.value,
            reason,
            self.active_method.value,
            exc_info=exc,
        )
        while self.active_method is not PowerMethod.ESTIMATE:
            method, meter = self._candidates[0]
            try:
                meter.start()
                return notes
            except Exception as err:
                reason, hint = (
                    (err.reason, err.hint)
                    if isinstance(err, MeterUnavailable)
                    else (f"{type(err).__name__}: {err}", None)
                )
            with self._lock:
                self._candidates = self._candidates[1:]
                self._out[method] = MeterStatus(method, "failed", reason, hint)
            log.warning(
                "power meter %s cannot take over (%s); falling back to %s",
                method.value,
                reason,
                self.active_method.value,
            )
            notes.append(f"{method.value} could not take over ({reason})")
        return notes
