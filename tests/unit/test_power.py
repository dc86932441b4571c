"""Power meters against fake sysfs trees and recorded command output, and the chain over them."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.config import PowerConfig, load_config
from agent.errors import AgentError, ConfigError
from agent.power import METERS
from agent.power.base import (
    Meter,
    MeterError,
    MeterUnavailable,
    PowerReading,
    WindowSkipped,
    attribute_energy,
    read_sysfs,
)
from agent.power.chain import MAX_SKIPS, MeterChain, build_meter
from agent.power.estimate import EstimateMeter
from agent.power.hwmon import HwmonMeter
from agent.power.nvml import NvmlMeter
from agent.power.pmic import PmicMeter, parse_pmic_adc
from agent.power.rapl import RaplMeter
from agent.protocol import PowerMethod

DATA = Path(__file__).parents[1] / "data" / "power"
MAX_RANGE = 262143328850  # max_energy_range_uj of the fake packages


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def copy_tree(name: str, tmp_path: Path) -> Path:
    """A writable copy of a committed fake tree, for tests that move counters."""
    return Path(shutil.copytree(DATA / name, tmp_path / name))


def set_value(path: Path, value: int) -> None:
    path.write_text(f"{value}\n")


def bump(path: Path, delta: int) -> None:
    set_value(path, int(path.read_text()) + delta)


# ------------------------------------------------------------------ energy per inference


def test_energy_above_idle_is_attributed_by_inference_share_of_cpu() -> None:
    # 10 W over 5 s, 4 W idle -> 30 J above idle; a quarter of the CPU time was inference.
    energy = attribute_energy(10.0, 4.0, 5.0, process_cpu_s=2.0, inference_cpu_s=0.5, inferences=3)
    assert energy == pytest.approx(30.0 * 0.25 / 3)


def test_energy_per_inference_is_never_negative_and_none_without_inferences() -> None:
    assert attribute_energy(2.0, 4.0, 5.0, 2.0, 0.5, 10) == 0.0  # below idle: clamped
    assert attribute_energy(10.0, 4.0, 5.0, 2.0, 0.5, 0) is None
    # Inference CPU measured per thread can slightly exceed the process's: share capped at 1.
    assert attribute_energy(10.0, 4.0, 5.0, 0.5, 0.6, 1) == pytest.approx(30.0)
    assert attribute_energy(10.0, 4.0, 5.0, 0.0, 0.0, 5) == 0.0


def test_estimate_and_attribution_agree_on_the_estimates_own_power() -> None:
    estimate = EstimateMeter(idle_w=3.0, active_w_per_core=2.0)
    reading = estimate.read(10.0, 4.0, 1.0, 100)
    attributed = attribute_energy(reading.power_w, 3.0, 10.0, 4.0, 1.0, 100)
    assert reading.energy_per_inference_j == pytest.approx(attributed)


# ------------------------------------------------------------------------------- RAPL


def test_rapl_sums_packages_only_over_the_meters_own_clock(tmp_path: Path) -> None:
    root = copy_tree("rapl", tmp_path)
    clock = Clock()
    meter = RaplMeter(root, idle_w=20.0, clock=clock)
    meter.start()
    bump(root / "intel-rapl:0/energy_uj", 150_000_000)  # 150 J
    bump(root / "intel-rapl:1/energy_uj", 100_000_000)  # 100 J
    for overlapping in ("intel-rapl:0:0", "intel-rapl:0:1", "intel-rapl:1:0", "intel-rapl-mmio:0"):
        bump(root / overlapping / "energy_uj", 90_000_000)  # must not be counted again
    clock.t += 5.0
    reading = meter.read(5.0, process_cpu_s=2.0, inference_cpu_s=1.0, inferences=10)
    assert reading.method is PowerMethod.RAPL
    assert reading.power_w == pytest.approx(50.0)
    assert reading.energy_per_inference_j == pytest.approx((50.0 - 20.0) * 5.0 * 0.5 / 10)
    assert reading.note is None


def test_rapl_counter_wraparound_uses_max_energy_range(tmp_path: Path) -> None:
    root = copy_tree("rapl", tmp_path)
    set_value(root / "intel-rapl:0/energy_uj", MAX_RANGE - 40_000_000)
    clock = Clock()
    meter = RaplMeter(root, clock=clock)
    meter.start()
    set_value(root / "intel-rapl:0/energy_uj", 10_000_000)  # wrapped: 40 J + 10 J
    bump(root / "intel-rapl:1/energy_uj", 50_000_000)
    clock.t += 10.0
    assert meter.read(10.0, 1.0, 0.5, 5).power_w == pytest.approx(10.0)


def test_rapl_counter_going_backwards_skips_one_window_then_measures(tmp_path: Path) -> None:
    root = copy_tree("rapl", tmp_path)
    clock = Clock()
    meter = RaplMeter(root, clock=clock)
    meter.start()
    bump(root / "intel-rapl:0/energy_uj", -5_000_000)  # not a wrap: far from the range's end
    clock.t += 5.0
    with pytest.raises(WindowSkipped, match="went backwards"):
        meter.read(5.0, 1.0, 0.5, 5)
    bump(root / "intel-rapl:0/energy_uj", 25_000_000)
    bump(root / "intel-rapl:1/energy_uj", 25_000_000)
    clock.t += 5.0
    assert meter.read(5.0, 1.0, 0.5, 5).power_w == pytest.approx(10.0)


def test_rapl_permission_error_explains_the_5_10_change_and_the_fix() -> None:
    # Tests may run as root, where chmod 000 stops nothing: inject the denial at the reader.
    def deny_energy(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return read_sysfs(path)

    meter = RaplMeter(DATA / "rapl", read_text=deny_energy)
    with pytest.raises(MeterUnavailable) as caught:
        meter.start()
    assert "permission denied" in caught.value.reason
    hint = caught.value.hint or ""
    assert "5.10" in hint and "PLATYPUS" in hint
    assert 'SUBSYSTEM=="powercap"' in hint and "CAP_DAC_READ_SEARCH" in hint
    assert isinstance(caught.value, AgentError)


def test_rapl_unavailable_without_powercap_or_packages(tmp_path: Path) -> None:
    with pytest.raises(MeterUnavailable, match=r"no .* exposes no powercap"):
        RaplMeter(tmp_path / "missing").start()
    with pytest.raises(MeterUnavailable, match="no RAPL package zone"):
        RaplMeter(DATA / "hwmon_jetson").start()


def test_rapl_zone_vanishing_mid_run_is_a_meter_error(tmp_path: Path) -> None:
    root = copy_tree("rapl", tmp_path)
    meter = RaplMeter(root, clock=Clock())
    meter.start()
    (root / "intel-rapl:1/energy_uj").unlink()
    with pytest.raises(MeterError, match="intel-rapl:1"):
        meter.read(5.0, 1.0, 0.5, 5)


# ------------------------------------------------------------------------------ hwmon


def test_hwmon_jetson_uses_the_total_input_rail_not_the_sum() -> None:
    meter = HwmonMeter(DATA / "hwmon_jetson", idle_w=5.0)
    meter.start()
    assert [rail.label for rail in meter.rails] == ["VDD_IN"]
    reading = meter.read(5.0, 2.0, 1.0, 10)
    assert reading.method is PowerMethod.HWMON
    assert reading.power_w == pytest.approx(5.072 * 1.296, abs=1e-4)
    assert reading.energy_per_inference_j == pytest.approx((6.573312 - 5.0) * 5.0 * 0.5 / 10)


def test_hwmon_configured_rails_are_summed_and_missing_ones_named() -> None:
    meter = HwmonMeter(DATA / "hwmon_jetson", rails=["VDD_CPU_GPU_CV", "vdd_soc"])
    meter.start()
    assert meter.read(5.0, 1.0, 0.5, 1).power_w == pytest.approx(
        5.064 * 0.312 + 5.064 * 0.544, abs=1e-4
    )
    with pytest.raises(MeterUnavailable, match=r"VDD_GPU not found.*VDD_IN, VDD_CPU_GPU_CV"):
        HwmonMeter(DATA / "hwmon_jetson", rails=["VDD_GPU"]).start()


def test_hwmon_without_total_rail_sums_connected_channels_only() -> None:
    meter = HwmonMeter(DATA / "hwmon_agx_orin")
    meter.start()
    assert [rail.label for rail in meter.rails] == [
        "VDD_GPU_SOC",
        "VDD_CPU_CV",
        "VIN_SYS_5V0",
        "VDDQ_VDD2_1V8AO",
    ]
    expected = 19.992 * 1.520 + 19.992 * 0.400 + 5.008 * 0.840 + 4.984 * 0.176
    assert meter.read(5.0, 1.0, 0.5, 1).power_w == pytest.approx(expected, abs=1e-4)


def test_hwmon_ina219_power_input_in_microwatts() -> None:
    meter = HwmonMeter(DATA / "hwmon_ina219")
    meter.start()
    assert meter.read(5.0, 1.0, 0.5, 1).power_w == pytest.approx(7.7)


def test_hwmon_unavailable_without_an_ina_device(tmp_path: Path) -> None:
    with pytest.raises(MeterUnavailable, match="no INA power monitor"):
        HwmonMeter(DATA / "rapl").start()
    with pytest.raises(MeterUnavailable, match="exposes no hwmon"):
        HwmonMeter(tmp_path / "missing").start()


def test_hwmon_rail_vanishing_mid_run_is_a_meter_error(tmp_path: Path) -> None:
    root = copy_tree("hwmon_jetson", tmp_path)
    meter = HwmonMeter(root)
    meter.start()
    (root / "hwmon1/curr1_input").unlink()
    with pytest.raises(MeterError, match="VDD_IN"):
        meter.read(5.0, 1.0, 0.5, 1)


# ------------------------------------------------------------------------ Pi 5 PMIC

PMIC_OUTPUT = (DATA / "vcgencmd_pmic_read_adc.txt").read_text()


def runner(stdout: str = PMIC_OUTPUT, returncode: int = 0, stderr: str = "") -> Any:
    calls: list[Sequence[str]] = []

    def run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        calls.append(list(args))
        return subprocess.CompletedProcess(list(args), returncode, stdout, stderr)

    run.calls = calls  # type: ignore[attr-defined]
    return run


def test_pmic_sums_volts_times_amps_of_paired_rails() -> None:
    rails = parse_pmic_adc(PMIC_OUTPUT)
    assert len(rails) == 12 and "EXT5V" not in rails and "BATT" not in rails
    assert rails["VDD_CORE"] == pytest.approx(2.1604 * 0.87)
    run = runner()
    meter = PmicMeter(run, idle_w=1.5)
    meter.start()
    reading = meter.read(5.0, 2.0, 1.0, 10)
    assert run.calls[0] == ["vcgencmd", "pmic_read_adc"]
    assert reading.method is PowerMethod.PMIC
    assert reading.power_w == pytest.approx(sum(rails.values()), abs=1e-4)
    assert reading.power_w == pytest.approx(3.0103, abs=1e-3)
    assert reading.energy_per_inference_j == pytest.approx((3.0103 - 1.5) * 5.0 * 0.5 / 10, 1e-3)


def test_pmic_unavailable_without_vcgencmd_or_without_pmic() -> None:
    def missing(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(2, "No such file or directory", args[0])

    with pytest.raises(MeterUnavailable, match="vcgencmd not found"):
        PmicMeter(missing).start()
    pi4 = (DATA / "vcgencmd_pmic_read_adc_pi4.txt").read_text()
    with pytest.raises(MeterUnavailable, match="not a Raspberry Pi 5"):
        PmicMeter(runner(pi4)).start()
    with pytest.raises(MeterUnavailable) as caught:
        PmicMeter(runner("", 255, "VCHI initialization failed\n")).start()
    assert "video group" in (caught.value.hint or "")


def test_pmic_command_failing_mid_run_is_a_meter_error() -> None:
    meter = PmicMeter(runner())
    meter.start()
    meter.run = runner("", 1, 'error=1 error_msg="failed"\n')
    with pytest.raises(MeterError, match="exited with 1"):
        meter.read(5.0, 1.0, 0.5, 1)


# ------------------------------------------------------------------------------ NVML


class FakeNvml:
    """The part of pynvml the meter uses: GPU 0 has the energy counter, GPU 1 only samples."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: int = 2) -> None:
        self.gpus = gpus
        self.energy_mj = 5_000_000
        self.power_mw = 35_000

    def nvmlInit(self) -> None:
        if self.gpus < 0:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self.power_mw


def test_nvml_counter_and_sampled_gpus_are_summed() -> None:
    nvml, clock = FakeNvml(), Clock()
    meter = NvmlMeter(nvml, idle_w=40.0, clock=clock)
    meter.start()
    assert [gpu.counter for gpu in meter.gpus] == [True, False]
    nvml.energy_mj += 300_000  # 300 J in 5 s on GPU 0
    clock.t += 5.0
    reading = meter.read(5.0, 1.0, 0.5, 10)
    assert reading.method is PowerMethod.NVML
    assert reading.power_w == pytest.approx(60.0 + 35.0)
    assert reading.energy_per_inference_j == pytest.approx((95.0 - 40.0) * 5.0 * 0.5 / 10)


def test_nvml_counter_going_backwards_skips_the_window() -> None:
    nvml, clock = FakeNvml(), Clock()
    meter = NvmlMeter(nvml, clock=clock)
    meter.start()
    nvml.energy_mj = 1_000
    clock.t += 5.0
    with pytest.raises(WindowSkipped, match="backwards"):
        meter.read(5.0, 1.0, 0.5, 1)
    nvml.energy_mj += 50_000
    clock.t += 5.0
    assert meter.read(5.0, 1.0, 0.5, 1).power_w == pytest.approx(10.0 + 35.0)


def test_nvml_unavailable_without_module_driver_or_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with pytest.raises(MeterUnavailable) as caught:
        NvmlMeter().start()
    assert caught.value.hint == "pip install nvidia-ml-py"
    with pytest.raises(MeterUnavailable, match="Driver Not Loaded"):
        NvmlMeter(FakeNvml(gpus=-1)).start()
    with pytest.raises(MeterUnavailable, match="NVML found no GPU"):
        NvmlMeter(FakeNvml(gpus=0)).start()


# ----------------------------------------------------------------------------- chain


def fake_builder(
    config: PowerConfig, clock: Clock, run: Callable[..., Any] | None = None
) -> Callable[[PowerMethod, PowerConfig], Meter]:
    """build_meter, with the test's clock, command runner and no NVML module."""

    def build(method: PowerMethod, cfg: PowerConfig) -> Meter:
        idle = cfg.idle_for(method)
        if method is PowerMethod.RAPL:
            return RaplMeter(cfg.rapl_root, idle_w=idle, clock=clock)
        if method is PowerMethod.PMIC:
            return PmicMeter(run or runner("", 127, "vcgencmd: not found"), idle_w=idle)
        if method is PowerMethod.NVML:
            return NvmlMeter(FakeNvml(gpus=0), idle_w=idle, clock=clock)
        return build_meter(method, cfg)

    return build


def test_chain_measures_with_the_first_meter_that_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = PowerConfig(rapl_root=tmp_path / "none", hwmon_root=DATA / "hwmon_jetson")
    chain = MeterChain(config, fake_builder(config, Clock(), runner()))
    before_start = chain.active_method
    assert before_start is PowerMethod.ESTIMATE
    with caplog.at_level(logging.INFO, logger="agent.power.chain"):
        chain.start()
    assert chain.active_method is PowerMethod.HWMON
    states = {s.method: s.state for s in chain.status()}
    assert states == {
        PowerMethod.RAPL: "unavailable",
        PowerMethod.HWMON: "active",
        PowerMethod.PMIC: "standby",
        PowerMethod.NVML: "unavailable",
        PowerMethod.ESTIMATE: "standby",
    }
    pmic_status = chain.status()[2]
    assert pmic_status.as_dict() == {"method": "pmic", "state": "standby"}
    assert sum("power meter rapl unavailable" in r.message for r in caplog.records) == 1
    reading = chain.read(5.0, 1.0, 0.5, 5)
    assert reading.method is PowerMethod.HWMON and reading.note is None


def test_chain_falls_back_mid_run_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = copy_tree("rapl", tmp_path)
    config = PowerConfig(
        meters=[PowerMethod.RAPL], rapl_root=root, idle_w=3.0, active_w_per_core=2.0
    )
    clock = Clock()
    chain = MeterChain(config, fake_builder(config, clock))
    chain.start()
    assert [s.method for s in chain.status()] == [PowerMethod.RAPL, PowerMethod.ESTIMATE]
    bump(root / "intel-rapl:0/energy_uj", 100_000_000)
    clock.t += 5.0
    assert chain.read(5.0, 1.0, 0.5, 5).method is PowerMethod.RAPL

    shutil.rmtree(root / "intel-rapl:0")
    clock.t += 5.0
    with caplog.at_level(logging.WARNING, logger="agent.power.chain"):
        reading = chain.read(5.0, 2.5, 1.0, 10)
    assert reading.method is PowerMethod.ESTIMATE
    assert reading.power_w == pytest.approx(3.0 + 2.0 * 0.5)
    assert reading.note is not None
    assert reading.note.startswith("rapl failed (cannot read ")
    assert reading.note.endswith("; fell back to estimate")
    assert chain.active_method is PowerMethod.ESTIMATE
    assert chain.status()[0].state == "failed"
    later = chain.read(5.0, 1.0, 0.5, 5)
    assert later.method is PowerMethod.ESTIMATE and later.note is None
    assert sum("rapl failed mid-run" in r.message for r in caplog.records) == 1


def test_chain_failover_rebaselines_the_next_meter(tmp_path: Path) -> None:
    run = runner()
    config = PowerConfig(meters=[PowerMethod.PMIC, PowerMethod.RAPL], rapl_root=DATA / "rapl")
    chain = MeterChain(config, fake_builder(config, Clock(), run))
    chain.start()
    assert chain.status()[0].state == "active"
    run_fail = runner("", 1, "boom")
    chain._candidates[0][1].run = run_fail  # type: ignore[attr-defined]
    reading = chain.read(5.0, 1.0, 0.5, 1)
    # RAPL was re-started at the failover, so it has no interval yet: the estimate covers this
    # window, and RAPL measures the next one.
    assert reading.method is PowerMethod.ESTIMATE
    assert reading.note is not None and reading.note.startswith("pmic failed (")
    assert "rapl skipped this window (only 0.000 s since the RAPL baseline)" in reading.note
    assert chain.active_method is PowerMethod.RAPL


def test_chain_skipped_windows_use_the_estimate_then_drop_a_meter_that_keeps_skipping() -> None:
    class Skipping:
        method = PowerMethod.NVML

        def start(self) -> None:
            pass

        def read(self, *args: Any) -> PowerReading:
            raise WindowSkipped("counter reset")

    config = PowerConfig(meters=[PowerMethod.NVML])
    chain = MeterChain(config, lambda method, cfg: Skipping())
    chain.start()
    for _ in range(MAX_SKIPS - 1):
        reading = chain.read(5.0, 1.0, 0.5, 1)
        assert reading.method is PowerMethod.ESTIMATE
        assert reading.note == "nvml skipped this window (counter reset); fell back to estimate"
        assert chain.active_method is PowerMethod.NVML
    reading = chain.read(5.0, 1.0, 0.5, 1)
    assert reading.note is not None and reading.note.startswith(
        f"nvml failed (counter reset; {MAX_SKIPS} windows in a row)"
    )
    assert chain.active_method is PowerMethod.ESTIMATE


def test_chain_survives_a_meter_that_crashes_or_cannot_be_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Broken:
        method = PowerMethod.RAPL

        def start(self) -> None:
            raise RuntimeError("bug")

        def read(self, *args: Any) -> PowerReading:
            raise AssertionError("never read")

    monkeypatch.setitem(METERS, PowerMethod.HWMON, "agent.power.no_such_module:Meter")

    def build(method: PowerMethod, cfg: PowerConfig) -> Meter:
        return Broken() if method is PowerMethod.RAPL else build_meter(method, cfg)

    config = PowerConfig(meters=[PowerMethod.RAPL, PowerMethod.HWMON])
    chain = MeterChain(config, build)
    chain.start()
    rapl, hwmon, estimate = chain.status()
    assert (rapl.state, rapl.reason) == ("unavailable", "RuntimeError: bug")
    assert hwmon.state == "unavailable" and "cannot import agent.power.no_such_module" in (
        hwmon.reason or ""
    )
    assert estimate.state == "active"
    assert chain.read(5.0, 1.0, 0.5, 1).method is PowerMethod.ESTIMATE


def test_chain_always_ends_with_the_estimate() -> None:
    chain = MeterChain(PowerConfig(meters=[PowerMethod.HWMON]))
    assert chain.order == [PowerMethod.HWMON, PowerMethod.ESTIMATE]
    chain = MeterChain(PowerConfig(meters=[PowerMethod.ESTIMATE, PowerMethod.RAPL]))
    assert chain.order == [PowerMethod.ESTIMATE]


# ---------------------------------------------------------------------------- config


def test_power_config_from_yaml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "device_id: cam-1\n"
        "power:\n"
        "  meters: [hwmon, estimate]\n"
        "  hwmon_rails: [VDD_IN]\n"
        "  meter_idle_w: {hwmon: 4.5}\n"
    )
    config = load_config(path, environ={"GREENFLEET_AGENT__POWER__RAPL_ROOT": "/tmp/powercap"})
    assert config.power.meters == [PowerMethod.HWMON, PowerMethod.ESTIMATE]
    assert config.power.idle_for(PowerMethod.HWMON) == 4.5
    assert config.power.idle_for(PowerMethod.RAPL) == config.power.idle_w
    assert config.power.rapl_root == Path("/tmp/powercap")
    path.write_text("device_id: cam-1\npower:\n  meters: [rapl, rapl]\n")
    with pytest.raises(ConfigError, match="repeated: rapl"):
        load_config(path, environ={})
    path.write_text("device_id: cam-1\npower:\n  meters: [watts]\n")
    with pytest.raises(ConfigError, match=r"power\.meters\[0\]: invalid enum value"):
        load_config(path, environ={})


def test_meter_constructors_do_no_io(tmp_path: Path) -> None:
    def no_io(*args: Any) -> Any:
        raise AssertionError("I/O in a constructor")

    missing = tmp_path / "missing"
    RaplMeter(missing, read_text=no_io, clock=no_io)
    HwmonMeter(missing, read_text=no_io)
    PmicMeter(no_io)
    NvmlMeter(no_io, clock=no_io)
    MeterChain(PowerConfig(rapl_root=missing), no_io)
