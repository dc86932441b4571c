"""Raspberry Pi 5 power from its PMIC's rail ADCs, through ``vcgencmd pmic_read_adc``.

The command prints one line per reading, current and voltage separately::

      VDD_CORE_A current(7)=2.16040000A
      VDD_CORE_V volt(15)=0.87000000V

Power is the sum over rails that have both (``<rail>_A`` x ``<rail>_V``); voltage-only lines
such as ``EXT5V_V`` (the USB-C input) and ``BATT_V`` carry no current and are left out. The
rails are the SoC, memory and on-board supplies behind the PMIC, not USB devices, HATs or the
PMIC's own conversion losses, so the figure is below what the wall supply delivers: set
``power.meter_idle_w.pmic`` to its idle value. Like hwmon, this is a sample at ``read()``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from agent.power.base import MeterError, MeterUnavailable, PowerReading, attribute_energy
from agent.protocol import PowerMethod

if TYPE_CHECKING:
    import subprocess

CommandRunner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]

_LINE = re.compile(
    r"^\s*(?P<rail>\S+)_(?P<kind>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)[AV]\s*$"
)
TIMEOUT_S = 5.0


def run_command(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a short command and capture its output (the default runner). subprocess is imported
    here: an agent whose meter is not a PMIC never starts a process and does not load it."""
    import subprocess

    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def on_path(command: str) -> bool:
    """Whether ``command`` names an executable file, as a path or on PATH (shutil.which does
    this too, at the price of importing shutil)."""
    if os.sep in command:
        return os.access(command, os.X_OK)
    folders = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return any(os.access(os.path.join(folder or ".", command), os.X_OK) for folder in folders)


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Watts per rail from ``vcgencmd pmic_read_adc`` output; rails lacking A or V are left out."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            target = amps if match["kind"] == "A" else volts
            target[match["rail"]] = float(match["value"])
    return {rail: amps[rail] * volts[rail] for rail in amps if rail in volts}


class PmicMeter:
    """Raspberry Pi 5 power: the PMIC's rails, V x A summed (see module docstring)."""

    method = PowerMethod.PMIC

    def __init__(
        self,
        run: CommandRunner = run_command,
        *,
        command: str = "vcgencmd",
        idle_w: float = 0.0,
    ) -> None:
        self.run = run
        self.command = command
        self.idle_w = idle_w
        self.rails: list[str] = []

    def start(self) -> None:
        """Run the command once; MeterUnavailable unless it prints rail readings. The default
        runner looks for the command on PATH first: on a host that is not a Pi, learning that
        costs no process (and no import of subprocess)."""
        if self.run is run_command and not on_path(self.command):
            raise MeterUnavailable(
                f"{self.command} not found: not a Raspberry Pi",
                "on Raspberry Pi OS it comes with the raspi-utils package",
            )
        try:
            rails = self._sample()
        except FileNotFoundError as exc:
            raise MeterUnavailable(
                f"{self.command} not found: not a Raspberry Pi",
                "on Raspberry Pi OS it comes with the raspi-utils package",
            ) from exc
        except OSError as exc:
            raise MeterUnavailable(f"cannot run {self.command}: {exc}") from exc
        except MeterError as exc:
            hint = None
            if "VCHI" in str(exc) or "vcio" in str(exc):
                hint = "add the agent's user to the video group (it needs /dev/vcio)"
            raise MeterUnavailable(str(exc), hint) from exc
        if not rails:
            raise MeterUnavailable(
                f"{self.command} pmic_read_adc printed no rail currents: not a Raspberry Pi 5"
            )
        self.rails = sorted(rails)

    def read(
        self, window_s: float, process_cpu_s: float, inference_cpu_s: float, inferences: int
    ) -> PowerReading:
        """The rails' summed power now, taken as the window's mean."""
        try:
            rails = self._sample()
        except OSError as exc:
            raise MeterError(f"cannot run {self.command} pmic_read_adc: {exc}") from exc
        if not rails:
            raise MeterError(f"{self.command} pmic_read_adc printed no rail readings")
        power = sum(rails.values())
        energy = attribute_energy(
            power, self.idle_w, window_s, process_cpu_s, inference_cpu_s, inferences
        )
        return PowerReading(round(power, 4), energy, self.method)

    def _sample(self) -> dict[str, float]:
        import subprocess  # see run_command

        args = [self.command, "pmic_read_adc"]
        try:
            done = self.run(args)
        except subprocess.TimeoutExpired as exc:
            raise MeterError(f"{' '.join(args)} did not answer within {exc.timeout} s") from exc
        if done.returncode != 0:
            detail = (done.stderr or done.stdout or "").strip().splitlines()
            raise MeterError(
                f"{' '.join(args)} exited with {done.returncode}"
                + (f": {detail[-1]}" if detail else "")
            )
        return parse_pmic_adc(done.stdout)
