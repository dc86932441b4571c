"""Board power from INA current/power monitors through the Linux hwmon sysfs class.

Finds hwmon devices whose ``name`` is an INA monitor (ina3221, ina219, ina226, ina238, ina260,
...). A device with ``power<n>_input`` (µW, the ina2xx family) is read directly; an INA3221,
which has none, gives bus voltage ``in<n>_input`` (mV) times current ``curr<n>_input`` (mA) for
its channels 1-3, labelled by ``in<n>_label`` (its ``curr4`` is the sum of the channels and
``in4``-``in7`` are shunt voltages, so they are left out).

Rails on a board are often nested: on a Jetson, ``VDD_IN`` is the whole module's input and
``VDD_CPU_GPU_CV`` and ``VDD_SOC`` are parts of it, so summing all three would count twice. With
no ``rails`` configured the meter uses the total-input rail when the board has one
(:data:`TOTAL_RAILS`) and sums every rail only when none is labelled as the total.

This is a sample at the moment of ``read()`` (the monitor's own averaging window, a few ms),
not an integral over the telemetry window like RAPL's counter: good for steady loads, noisy for
bursty ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from agent.power.base import (
    MeterError,
    MeterUnavailable,
    PowerReading,
    attribute_energy,
    read_sysfs,
)
from agent.protocol import PowerMethod

INA_NAME = re.compile(r"^ina\d+[a-z]*$")
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")  # Jetson module input: Orin/Xavier NX, Nano/TX2
_INPUT = re.compile(r"^(power|curr)(\d+)_input$")


class Rail(msgspec.Struct, frozen=True):
    """One measured rail: its label and either a power file (µW) or a voltage/current pair."""

    label: str
    power: Path | None = None
    volts: Path | None = None
    amps: Path | None = None


class HwmonMeter:
    """Board power sampled from INA power monitors' rails (see module docstring)."""

    method = PowerMethod.HWMON

    def __init__(
        self,
        root: Path = Path("/sys/class/hwmon"),
        rails: Sequence[str] | None = None,
        *,
        idle_w: float = 0.0,
        read_text: Callable[[Path], str] = read_sysfs,
    ) -> None:
        self.root = root
        self.wanted = list(rails) if rails else None
        self.idle_w = idle_w
        self._read = read_text
        self.rails: list[Rail] = []

    def start(self) -> None:
        """Find the INA rails, pick the ones to use and read them once."""
        if not self.root.is_dir():
            raise MeterUnavailable(f"no {self.root}: this kernel exposes no hwmon sensors")
        found = [rail for device in self._ina_devices() for rail in self._rails(device)]
        if not found:
            raise MeterUnavailable(
                f"no INA power monitor (ina3221, ina219, ina226, ...) under {self.root}",
                "boards with one need its driver (ina3221 or ina2xx) loaded",
            )
        chosen = self._choose(found)
        for rail in chosen:
            try:
                self._watts(rail)
            except PermissionError as exc:
                raise MeterUnavailable(
                    f"cannot read rail {rail.label}: permission denied",
                    f"let the agent's user read {self.root}/hwmon*/*_input (a udev rule, or "
                    "run it in the group that owns them)",
                ) from exc
            except (OSError, ValueError) as exc:
                raise MeterUnavailable(f"cannot read rail {rail.label}: {exc}") from exc
        self.rails = chosen

    def read(
        self, window_s: float, process_cpu_s: float, inference_cpu_s: float, inferences: int
    ) -> PowerReading:
        """The summed power of the chosen rails now, taken as the window's mean."""
        if not self.rails:
            raise MeterError("the hwmon meter was not started")
        total = 0.0
        for rail in self.rails:
            try:
                total += self._watts(rail)
            except (OSError, ValueError) as exc:
                raise MeterError(f"cannot read hwmon rail {rail.label}: {exc}") from exc
        energy = attribute_energy(
            total, self.idle_w, window_s, process_cpu_s, inference_cpu_s, inferences
        )
        return PowerReading(round(total, 4), energy, self.method)

    def _ina_devices(self) -> list[tuple[Path, str]]:
        devices = []
        for path in sorted(self.root.iterdir(), key=lambda p: p.name):
            try:
                name = self._read(path / "name")
            except OSError:
                continue
            if INA_NAME.match(name):
                devices.append((path, name))
        return devices

    def _rails(self, device: tuple[Path, str]) -> list[Rail]:
        path, name = device
        inputs: dict[str, list[int]] = {"power": [], "curr": []}
        for entry in path.iterdir():
            match = _INPUT.match(entry.name)
            if match:
                inputs[match[1]].append(int(match[2]))
        prefix = self._optional(path / "label") or path.name
        rails = []
        if inputs["power"]:
            for n in sorted(inputs["power"]):
                label = self._optional(path / f"power{n}_label") or f"{prefix}/power{n}"
                rails.append(Rail(label, power=path / f"power{n}_input"))
            return rails
        for n in sorted(inputs["curr"]):
            volts = path / f"in{n}_input"
            if (name == "ina3221" and n > 3) or not volts.exists():
                continue
            if self._optional(path / f"in{n}_enable") == "0":
                continue
            label = (
                self._optional(path / f"in{n}_label")
                or self._optional(path / f"curr{n}_label")
                or f"{prefix}/ch{n}"
            )
            rails.append(Rail(label, volts=volts, amps=path / f"curr{n}_input"))
        return rails

    def _choose(self, found: list[Rail]) -> list[Rail]:
        by_label = {rail.label.upper(): rail for rail in found}
        if self.wanted:
            missing = [w for w in self.wanted if w.upper() not in by_label]
            if missing:
                raise MeterUnavailable(
                    f"hwmon rails {', '.join(missing)} not found; "
                    f"this board has {', '.join(r.label for r in found)}",
                    "fix power.hwmon_rails in the agent config",
                )
            return [by_label[w.upper()] for w in self.wanted]
        for total in TOTAL_RAILS:
            if total in by_label:
                return [by_label[total]]
        return found

    def _watts(self, rail: Rail) -> float:
        if rail.power is not None:
            return int(self._read(rail.power)) / 1e6
        assert rail.volts is not None and rail.amps is not None
        return int(self._read(rail.volts)) * int(self._read(rail.amps)) / 1e6

    def _optional(self, path: Path) -> str | None:
        try:
            return self._read(path) or None
        except OSError:
            return None
