"""The controller's check of an agent's reported hardware against its class profile."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from agent import protocol as p
from agent.hardware import read_hardware
from agent.protocol import HardwareFacts, ModelFormat
from controller.hardware_check import Mismatch, Severity, check_device, check_hardware
from device_configs.schema import DeviceProfile, load_profiles

PROFILES = load_profiles()
BOTH = [ModelFormat.ONNX, ModelFormat.TFLITE]
PI5 = HardwareFacts(
    arch="aarch64",
    cpu_model="",
    cpu_flags=["asimd", "asimddp", "asimdhp"],
    cores=4,
    memory_mb=8052,
    os="Linux 6.6.51+rpt-rpi-2712",
    python="3.11.2",
)
SERVER = HardwareFacts(
    arch="x86_64",
    cpu_model="Intel(R) Xeon(R) Silver 4314 CPU @ 2.40GHz",
    cpu_flags=["avx2", "avx512f", "avx512_vnni", "f16c", "fma"],
    cores=32,
    memory_mb=64000,
    os="Linux 6.1.0",
    python="3.11.9",
)
# What a Raspberry Pi 5 running 64-bit Raspberry Pi OS shows in /proc/cpuinfo (one core).
PI5_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b

Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


def check(
    name: str, facts: HardwareFacts, runtimes: Sequence[ModelFormat | str] = BOTH
) -> list[Mismatch]:
    profile: DeviceProfile = PROFILES[name]
    return check_hardware(profile, facts, runtimes)


def fields(found: list[Mismatch]) -> dict[str, Severity]:
    return {m.field: m.severity for m in found}


def test_a_matching_device_has_no_mismatches() -> None:
    assert check("rpi5", PI5) == []
    assert check("factory-server", SERVER) == []


def test_what_the_agent_reads_from_a_real_cpuinfo_matches_the_profile(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(PI5_CPUINFO)
    (tmp_path / "proc/meminfo").write_text("MemTotal:        8245360 kB\n")
    facts = p.replace(read_hardware(tmp_path), arch="aarch64", cores=4)
    assert check("rpi5", facts) == []


def test_another_architecture_is_an_error() -> None:
    [found] = check("rpi5", SERVER)  # x86 flags are not compared with Arm features
    assert (found.field, found.expected, found.reported) == ("arch", "aarch64", "x86_64")
    assert found.severity is Severity.ERROR and "fix device_class" in found.message


def test_other_spellings_of_the_arch_are_accepted() -> None:
    assert check("rpi5", p.replace(PI5, arch="arm64")) == []


def test_fewer_cores_warn_and_more_are_fine() -> None:
    found = check("rpi5", p.replace(PI5, cores=2))
    assert fields(found) == {"cores": Severity.WARNING}
    assert found[0].expected == "4" and found[0].reported == "2"
    assert check("rpi5", p.replace(PI5, cores=8)) == []


@pytest.mark.parametrize(
    "memory_mb, expected",
    [
        (7400, {}),  # 90% of 8192 is 7372.8: firmware and carve-outs are tolerated
        (4096, {"memory_mb": Severity.WARNING}),
        (0, {"memory_mb": Severity.WARNING}),  # unreadable
    ],
)
def test_memory_well_below_the_profile_warns(memory_mb: int, expected: dict[str, Severity]) -> None:
    found = check("rpi5", p.replace(PI5, memory_mb=memory_mb))
    assert fields(found) == expected


def test_a_missing_feature_that_variants_rely_on_is_an_error_others_warn() -> None:
    found = check("rpi5", p.replace(PI5, cpu_flags=["asimd"]))
    assert fields(found) == {
        "cpu.features.asimddp": Severity.ERROR,
        "cpu.features.asimdhp": Severity.WARNING,
    }
    found = check("factory-server", p.replace(SERVER, cpu_flags=["avx2", "avx512f"]))
    assert fields(found) == {
        "cpu.features.avx512_vnni": Severity.ERROR,
        "cpu.features.f16c": Severity.WARNING,
        "cpu.features.fma": Severity.WARNING,
    }


def test_no_features_reported_is_one_warning_not_a_list_of_errors() -> None:
    found = check("rpi5", p.replace(PI5, cpu_flags=[]))
    assert fields(found) == {"cpu.features": Severity.WARNING}
    assert "not checked" in found[0].message


def test_a_runtime_of_the_class_the_agent_lacks_is_an_error() -> None:
    [found] = check("rpi5", PI5, [ModelFormat.ONNX])
    assert found.field == "runtimes" and found.severity is Severity.ERROR
    assert found.reported == "onnx" and "tflite" in found.message
    assert check("coral-dev-board", p.replace(PI5, cpu_flags=["asimd"]), []) == [
        Mismatch(
            "runtimes",
            "tflite",
            "none",
            Severity.ERROR,
            "the agent cannot load tflite, which coral-dev-board runs: install the runtime "
            "(greenfleet[agent] for onnx, greenfleet[tflite] for tflite) and restart the agent",
        )
    ]


def test_the_generic_class_accepts_any_architecture() -> None:
    assert check("generic", SERVER, [ModelFormat.ONNX]) == []
    assert check("generic", PI5, ["onnx"]) == []


def test_an_unknown_class_is_one_error_listing_the_known_ones() -> None:
    [found] = check_device("rpi9", PI5, BOTH, PROFILES)
    assert found.field == "device_class" and found.severity is Severity.ERROR
    assert "unknown device class 'rpi9'" in found.message
    assert "rpi4, rpi5" in found.message and "thin-gateway" in found.message
    assert check_device("rpi5", PI5, BOTH, PROFILES) == []
