"""Intel and AMD CPU package energy from RAPL, through the Linux powercap sysfs class.

Each CPU package is a zone ``intel-rapl:N`` named ``package-N`` with a cumulative
``energy_uj`` counter that wraps at ``max_energy_range_uj``. AMD Zen CPUs appear under the same
``intel-rapl`` names (the kernel's RAPL MSR driver serves both; there is no ``amd-rapl`` zone).
Only top-level package zones are summed: subzones (``intel-rapl:0:0`` core, uncore, dram), the
MMIO duplicate ``intel-rapl-mmio:0`` and the ``psys`` platform zone all overlap the packages.

RAPL measures the CPU packages only, not the whole device: set ``power.meter_idle_w.rapl`` to
the packages' idle power so energy per inference counts only the power above it.

Since Linux 5.10 ``energy_uj`` is readable by root only (CVE-2020-8694, the PLATYPUS power side
channel); :data:`PERMISSION_HINT` says how to grant the agent read access.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from agent.power.base import (
    MeterError,
    MeterUnavailable,
    PowerReading,
    WindowSkipped,
    attribute_energy,
    read_sysfs,
)
from agent.protocol import PowerMethod

_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")
MIN_INTERVAL_S = 0.05  # below this a counter delta is mostly update jitter (~1 ms ticks)

PERMISSION_HINT = (
    "since Linux 5.10 energy_uj is readable by root only (PLATYPUS, CVE-2020-8694). Let the "
    "agent's group read it with a udev rule in /etc/udev/rules.d/90-greenfleet-rapl.rules: "
    'ACTION=="add", SUBSYSTEM=="powercap", KERNEL=="intel-rapl:*", '
    'RUN+="/bin/chgrp greenfleet /sys%p/energy_uj", RUN+="/bin/chmod g+r /sys%p/energy_uj" '
    "(then: udevadm trigger --subsystem-match=powercap --action=add), or once until reboot: "
    "sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj, or run the agent with "
    "CAP_DAC_READ_SEARCH (systemd: AmbientCapabilities=CAP_DAC_READ_SEARCH)"
)


class _Zone(msgspec.Struct):
    path: Path
    name: str
    max_range_uj: int | None
    last_uj: int = 0


class RaplMeter:
    """Mean power of all CPU packages from the RAPL energy counters, wraparound handled."""

    method = PowerMethod.RAPL

    def __init__(
        self,
        root: Path = Path("/sys/class/powercap"),
        *,
        idle_w: float = 0.0,
        read_text: Callable[[Path], str] = read_sysfs,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.idle_w = idle_w
        self._read = read_text
        self._clock = clock
        self._zones: list[_Zone] = []
        self._last_t = 0.0

    def start(self) -> None:
        """Find the package zones and take the baseline; MeterUnavailable says why not."""
        if not self.root.is_dir():
            raise MeterUnavailable(
                f"no {self.root}: this kernel exposes no powercap zones",
                "RAPL needs an x86 CPU and the intel_rapl_msr module (modprobe intel_rapl_msr)",
            )
        zones: list[_Zone] = []
        for path in sorted(self.root.iterdir(), key=lambda p: p.name):
            if not _PACKAGE_ZONE.match(path.name):
                continue
            try:
                name = self._read(path / "name")
            except OSError:
                continue
            if not name.startswith("package"):
                continue  # psys: the platform, which already includes the packages
            zones.append(_Zone(path, name, self._max_range(path)))
        if not zones:
            raise MeterUnavailable(
                f"no RAPL package zone (intel-rapl:N named package-N) under {self.root}",
                "RAPL needs an Intel CPU or an AMD Zen CPU and the intel_rapl_msr module",
            )
        for zone in zones:
            try:
                zone.last_uj = self._energy(zone)
            except PermissionError as exc:
                raise MeterUnavailable(
                    f"cannot read {zone.path / 'energy_uj'}: permission denied", PERMISSION_HINT
                ) from exc
            except (OSError, ValueError) as exc:
                raise MeterUnavailable(f"cannot read {zone.path / 'energy_uj'}: {exc}") from exc
        self._zones = zones
        self._last_t = self._clock()

    def read(
        self, window_s: float, process_cpu_s: float, inference_cpu_s: float, inferences: int
    ) -> PowerReading:
        """Energy used since the last read over the time since then; see module docstring."""
        if not self._zones:
            raise MeterError("the RAPL meter was not started")
        now = self._clock()
        values: list[int] = []
        for zone in self._zones:
            try:
                values.append(self._energy(zone))
            except (OSError, ValueError) as exc:
                raise MeterError(f"cannot read {zone.path / 'energy_uj'}: {exc}") from exc
        elapsed = now - self._last_t
        total_uj = 0
        backwards: list[str] = []
        for zone, value in zip(self._zones, values, strict=True):
            delta = _counter_delta(zone.last_uj, value, zone.max_range_uj)
            if delta is None:
                backwards.append(f"{zone.name} {zone.last_uj} -> {value} uJ")
            else:
                total_uj += delta
            zone.last_uj = value
        self._last_t = now
        if backwards:
            raise WindowSkipped(
                f"RAPL energy counter went backwards without wrapping ({', '.join(backwards)}); "
                "treated as a counter reset"
            )
        if elapsed < MIN_INTERVAL_S:
            raise WindowSkipped(f"only {elapsed:.3f} s since the RAPL baseline")
        power = total_uj / 1e6 / elapsed
        energy = attribute_energy(
            power, self.idle_w, window_s, process_cpu_s, inference_cpu_s, inferences
        )
        return PowerReading(round(power, 4), energy, self.method)

    def _energy(self, zone: _Zone) -> int:
        return int(self._read(zone.path / "energy_uj"))

    def _max_range(self, path: Path) -> int | None:
        try:
            value = int(self._read(path / "max_energy_range_uj"))
        except (OSError, ValueError):
            return None
        return value if value > 0 else None


def _counter_delta(before: int, after: int, max_range: int | None) -> int | None:
    """Increase of a counter that wraps at ``max_range``; None if it went backwards instead.

    A drop is a wrap only if the wrapped increase is under half the range: a package drawing
    100 W takes about 40 minutes to use a typical 262 kJ range, so a real wrap between two
    reads seconds apart leaves the counter near zero, and a bigger apparent jump is a reset.
    """
    if after >= before:
        return after - before
    if max_range is None:
        return None
    wrapped = max_range - before + after
    return wrapped if 0 <= wrapped < max_range // 2 else None
