"""Agent config: strict validation with readable errors, and environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import MqttInput, load_config
from agent.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults_and_resolves_state_dir(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "device_id: press-1\n"), environ={})
    assert config.broker.port == 1883
    assert config.input.type == "vibration"
    assert config.state_dir == (tmp_path / "agent-state").resolve()


def test_env_overrides_nested_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "device_id: press-1\nbroker:\n  host: broker.local\n")
    env = {
        "GREENFLEET_AGENT__BROKER__PORT": "8883",
        "GREENFLEET_AGENT__BROKER__PASSWORD": "s3cret",
        "GREENFLEET_AGENT__INPUT__TYPE": "mqtt",
        "GREENFLEET_AGENT__INPUT__TOPIC": "plc/line3/vib",
        "UNRELATED": "x",
    }
    config = load_config(path, environ=env)
    assert (config.broker.host, config.broker.port, config.broker.password) == (
        "broker.local",
        8883,
        "s3cret",
    )
    assert isinstance(config.input, MqttInput) and config.input.topic == "plc/line3/vib"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("device_id: a\nbrokr:\n  host: x\n", "brokr: unknown field"),
        ("device_id: a\nbroker:\n  port: 99999\n", "broker.port"),
        ("device_id: 'a b'\n", "device_id"),
        ("broker: {}\n", "device_id: required field missing"),
        ("device_id: a\n  bad: [indent\n", "not valid YAML"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("device_id: a\ninput: {type: camera}\n", "input"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), environ={})
    assert needle in str(err.value)
    assert "agent.yaml" in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_the_documented_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "docs" / "agent.example.yaml"
    config = load_config(example, environ={"GREENFLEET_AGENT__BROKER__PASSWORD": "x"})
    assert config.device_id == "gw-press-01" and config.broker.password == "x"
