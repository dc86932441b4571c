"""Device profiles: every committed class loads, the schema file is current, bad files explain."""

from __future__ import annotations

import copy
import io
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.hardware import NOTABLE_FLAGS
from device_configs.schema import (
    PROFILE_DIR,
    SCHEMA_FILE,
    CpuFeature,
    ProfileError,
    json_schema_text,
    load_profile,
    load_profiles,
    main,
    markdown_reference,
)

REPO = Path(__file__).parents[2]
CLASSES = {
    "rpi4",
    "rpi5",
    "jetson-orin-nano",
    "x86-ipc",
    "iot2050",
    "coral-dev-board",
    "thin-gateway",
    "factory-server",
    "generic",
}


def raw(name: str = "rpi4") -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())
    return copy.deepcopy(data)


def write(tmp_path: Path, data: Any, stem: str = "rpi4") -> Path:
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_committed_profile_loads_with_its_stem_as_name() -> None:
    profiles = load_profiles()
    assert set(profiles) >= CLASSES
    assert all(p.name == name for name, p in profiles.items())
    for profile in profiles.values():
        # int8 and fp16 follow from the kernel gains; no class ships a hand-set factor for them
        assert profile.speed.factors() == {"fp32": profile.speed.fp32}


def test_an_edgetpu_board_is_int8_only_and_the_default_class_exists() -> None:
    profiles = load_profiles()
    coral = profiles["coral-dev-board"]
    assert [p.value for p in coral.precisions] == ["int8"]
    assert [a.precisions for a in coral.accelerators] == [["int8"]]
    assert profiles["generic"].cpu.arch is None  # the agent's default device_class


def test_profile_features_use_the_agents_spelling() -> None:
    assert {f.value for f in CpuFeature} == set(NOTABLE_FLAGS)


def test_committed_schema_json_is_generated_from_the_model() -> None:
    assert SCHEMA_FILE.read_text() == json_schema_text(), (
        "regenerate: python -m device_configs.schema > device_configs/schema.json"
    )


def test_docs_carry_the_generated_reference() -> None:
    docs = (REPO / "docs" / "device-profiles.md").read_text()
    assert markdown_reference() in docs, (
        "regenerate the reference block: python -m device_configs.schema --markdown"
    )


def test_module_prints_schema_and_rejects_other_arguments() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([]) == 0
    assert out.getvalue() == json_schema_text()
    assert main(["--yaml"]) == 2


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("colour", "red", ["colour", "unknown field"]),
        ("cpu.clock_ghz", 1.8, ["cpu.clock_ghz", "unknown field", "allowed: arch, model"]),
        ("cpu.cores", 0, ["cpu.cores", "greater than or equal to 1"]),
        ("cpu.arch", "riscv64", ["cpu.arch", "x86_64"]),
        ("cpu.features", ["avx512_vnni", "asimd"], ["cpu", "avx512_vnni", "aarch64"]),
        ("power.idle_w", -1.0, ["power.idle_w", "greater than 0"]),
        ("power.budget_w", 20.0, ["power", "budget_w 20 W exceeds max_w 15 W"]),
        ("power.idle_w", 15.0, ["power", "idle_w 15 W must be below max_w"]),
        ("power.active_w_per_core", 5.0, ["idle_w + active_w_per_core x cpu.cores"]),
        ("runtimes", [], ["runtimes", "at least 1"]),
        ("precisions", ["int4"], ["precisions.0", "fp32"]),
        ("precisions", ["fp32", "fp32"], ["precisions lists fp32 more than once"]),
        ("speed.fp32", None, ["speed.fp32"]),
        ("speed.int4", 2.0, ["speed.int4"]),
        ("model_memory_mb", 8192, ["model_memory_mb 8192 exceeds memory_mb 4096"]),
        ("sources.cpu.colour", "x", ["sources cites cpu.colour"]),
        ("speed.fp16", 0, ["speed.fp16", "greater than 0"]),
    ],
)
def test_impossible_or_unknown_values_name_file_and_field(
    tmp_path: Path, path: str, value: Any, expected: list[str]
) -> None:
    data = raw()
    if path.startswith("sources."):
        data["sources"][path.removeprefix("sources.")] = value
    else:
        _set(data, path, value)
    target = write(tmp_path, data)
    with pytest.raises(ProfileError) as caught:
        load_profile(target)
    message = str(caught.value)
    assert str(target) in message
    for part in expected:
        assert part in message


def test_x86_arch_with_neon_is_rejected(tmp_path: Path) -> None:
    data = raw("x86-ipc")
    data["cpu"]["features"] = ["avx2", "neon"]
    with pytest.raises(ProfileError, match=r"cpu: features neon do not exist on x86_64"):
        load_profile(write(tmp_path, data, "x86-ipc"))


def test_a_feature_without_the_one_it_implies_is_rejected(tmp_path: Path) -> None:
    data = raw("factory-server")
    data["cpu"]["features"] = ["avx2", "avx512_vnni"]
    with pytest.raises(ProfileError, match="avx512_vnni but not avx512f"):
        load_profile(write(tmp_path, data, "factory-server"))


def test_every_fact_group_needs_a_source(tmp_path: Path) -> None:
    data = raw()
    del data["sources"]["power.idle_w"]  # one power source left: still cited
    load_profile(write(tmp_path, data))
    for key in [k for k in data["sources"] if k.startswith("power")]:
        del data["sources"][key]
    with pytest.raises(ProfileError, match=r"sources has no citation for power"):
        load_profile(write(tmp_path, data))


def test_an_accelerator_needs_a_source_and_a_runtime_of_the_class(tmp_path: Path) -> None:
    data = raw("jetson-orin-nano")
    data["accelerators"][0]["runtimes"] = ["tflite", "onnx"]
    data["runtimes"] = ["onnx"]
    with pytest.raises(ProfileError, match=r"accelerators.0.runtimes has tflite"):
        load_profile(write(tmp_path, data, "jetson-orin-nano"))
    data = raw("jetson-orin-nano")
    del data["sources"]["accelerators"]
    with pytest.raises(ProfileError, match="no citation for accelerators"):
        load_profile(write(tmp_path, data, "jetson-orin-nano"))


def test_a_missing_field_says_to_add_it(tmp_path: Path) -> None:
    data = raw()
    del data["speed"]
    with pytest.raises(ProfileError, match=r"speed: missing; add it"):
        load_profile(write(tmp_path, data))


def test_name_must_equal_the_file_stem(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"name: 'rpi4' differs .* set name: pi4"):
        load_profile(write(tmp_path, raw(), stem="pi4"))


def test_yaml_syntax_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rpi4.yaml"
    path.write_text("name: rpi4\ncpu: {arch: aarch64\n")
    with pytest.raises(ProfileError, match="not valid YAML") as caught:
        load_profile(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_file_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="must hold a mapping"):
        load_profile(write(tmp_path, ["rpi4"]))


def test_load_profiles_names_the_bad_file_and_needs_at_least_one(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"no \*\.yaml device profiles"):
        load_profiles(tmp_path)
    write(tmp_path, raw("rpi5"), "rpi5")
    bad = raw()
    bad["cpu"]["cores"] = 0
    write(tmp_path, bad)
    with pytest.raises(ProfileError, match=r"rpi4.yaml: cpu.cores"):
        load_profiles(tmp_path)
