"""Kernel gains: which int8/fp16 speed-up over fp32 a CPU gets in a runtime, and where from."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_configs.kernels import (
    KernelTable,
    host_text,
    load_kernel_gains,
    parse_host,
)
from device_configs.schema import ProfileError

TABLE = load_kernel_gains()


@pytest.mark.parametrize(
    "runtime, precision, arch, features, gain, kind",
    [
        ("onnxruntime", "int8", "x86_64", {"avx2", "fma"}, 1.5, "measured"),  # this build host
        ("onnxruntime", "int8", "x86_64", {"avx2", "avx512f", "avx512_vnni"}, 2.0, "estimate"),
        ("onnxruntime", "int8", "x86_64", {"avx2", "avx_vnni"}, 2.0, "estimate"),
        ("onnxruntime", "int8", "aarch64", {"asimd"}, 1.3, "estimate"),  # Cortex-A72
        ("onnxruntime", "int8", "aarch64", {"asimd", "asimddp"}, 2.0, "estimate"),  # A76
        ("litert", "int8", "aarch64", {"asimd"}, 1.3, "assumed"),
        ("onnxruntime", "int8", "unknown", set(), 1.0, "none"),  # the generic class
        ("onnxruntime", "fp16", "aarch64", {"asimdhp"}, 1.0, "none"),  # widened to fp32
    ],
)
def test_a_cpu_gets_the_largest_gain_of_the_features_it_has(
    runtime: str, precision: str, arch: str, features: set[str], gain: float, kind: str
) -> None:
    found = TABLE.gain(runtime, precision, arch, frozenset(features))
    assert (found.value, found.kind) == (gain, kind)
    assert arch in found.basis


def test_an_empty_table_gives_gain_one() -> None:
    assert KernelTable().gain("onnxruntime", "int8", "x86_64", frozenset({"avx2"})).value == 1.0


def test_every_row_says_where_its_figure_comes_from() -> None:
    assert TABLE.rows
    for row in TABLE.rows:
        assert row.kind.value in {"measured", "sourced", "estimate", "assumed"}
        assert len(row.source) > 40, row


@pytest.mark.parametrize(
    "text, problem",
    [
        (
            "gains: [{runtime: tvm, precision: int8, arch: x86_64, gain: 2, kind: assumed, "
            "source: 'x' }]",
            "gains.0.runtime",
        ),
        (
            "gains: [{runtime: litert, precision: int8, arch: x86_64, feature: neon2, gain: 2, "
            "kind: assumed, source: 'a long enough source'}]",
            "gains.0.feature",
        ),
        (
            "gains: [{runtime: litert, precision: int8, arch: x86_64, gain: 2, kind: guessed, "
            "source: 'a long enough source'}]",
            "gains.0.kind",
        ),
        (
            "gains:\n" + 2 * "  - {runtime: litert, precision: int8, arch: x86_64, gain: 2, "
            "kind: assumed, source: 'a long enough source'}\n",
            "two rows",
        ),
    ],
)
def test_a_bad_gain_file_names_file_and_row(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "kernel-gains.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=problem) as caught:
        load_kernel_gains(path)
    assert str(path) in str(caught.value)


def test_the_host_text_carries_the_flags_and_old_profiles_have_none() -> None:
    text = host_text("x86_64", 2, ["avx2", "fma"])
    assert text == "x86_64, 2 cores; cpu flags: avx2 fma"
    assert parse_host(text) == ("x86_64", frozenset({"avx2", "fma"}))
    assert parse_host("aarch64, 4 cores") == ("aarch64", None)
    assert parse_host("") == ("unknown", None)


@pytest.mark.parametrize(
    "here, host_gain, device_gain, there",
    [
        pytest.param(0.5, 2.0, 2.0, 0.5, id="same-gains-same-share"),
        pytest.param(1 / 1.5, 1.5, 2.0, 0.5, id="compute-bound-gets-the-device-gain"),
        pytest.param(0.47, 1.5, 2.0, 0.47 * 1.5 / 2.0, id="better-than-the-table-in-proportion"),
        # 0.9x on a 1.5x host: 70% of the time does not gain, 30% gains the device's 2x
        pytest.param(0.9, 1.5, 2.0, 0.7 + 0.3 / 2.0, id="overhead-bound-keeps-its-fixed-part"),
        pytest.param(1.0, 1.5, 2.0, 1.0, id="no-gain-here-none-there"),
        pytest.param(6.8, 1.5, 2.0, 6.8, id="a-slow-kernel-stays-slow"),
        pytest.param(0.9, 1.5, 1.3, 0.7 + 0.3 / 1.3, id="a-weaker-device"),
    ],
)
def test_a_variants_gain_carries_over_only_where_it_was_compute(
    here: float, host_gain: float, device_gain: float, there: float
) -> None:
    from device_configs.kernels import carry_ratio

    assert carry_ratio(here, host_gain, device_gain) == pytest.approx(there)
