"""Agent configuration: one YAML file, validated strictly, with environment overrides.

Any field can be overridden by an environment variable ``GREENFLEET_AGENT__<PATH>`` where
``<PATH>`` is the field path joined by double underscores, e.g.
``GREENFLEET_AGENT__BROKER__HOST=10.0.0.5``; values are parsed as YAML scalars. This is how
a systemd unit or a container injects credentials without editing the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError
from agent.protocol import DeviceId, FaultKind, PowerMethod

ENV_PREFIX = "GREENFLEET_AGENT__"


class Section(BaseModel):
    """Base of every config section: a misspelt key is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


class TlsConfig(Section):
    """TLS to the broker: the CA to pin and, for certificate auth, this device's certificate."""

    ca_file: Path = Field(description="PEM CA that signed the broker's certificate (pinned).")
    cert_file: Path | None = Field(default=None, description="PEM client certificate.")
    key_file: Path | None = Field(default=None, description="PEM client key (mode 0600).")
    server_name: str | None = Field(
        default=None, description="Name to check the broker certificate against; default host."
    )

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without cert_file (the client certificate)")
        return self

    def resolved(self, base: Path) -> TlsConfig:
        """A copy with relative file paths taken from ``base`` (the config file's folder)."""
        return self.model_copy(
            update={
                key: (base / value).resolve()
                for key in ("ca_file", "cert_file", "key_file")
                if (value := getattr(self, key)) is not None and not value.is_absolute()
            }
        )


class BrokerConfig(Section):
    """Where the site's MQTT broker is and how to log in.

    Without ``tls`` the connection is plain TCP, which is refused for a broker that is not on
    loopback unless ``allow_plaintext`` says so (and then warned about at every start).
    """

    host: str = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    allow_plaintext: bool = Field(
        default=False, description="Allow plain TCP to a broker that is not on loopback."
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: float = Field(default=0.5, gt=0, description="First reconnect delay.")
    reconnect_max_s: float = Field(default=30.0, gt=0, description="Cap of the backoff.")


class PowerConfig(Section):
    """Which power meters to try, where they read, and the profile figures for the estimate.

    Meters are tried in ``meters`` order at start; the first that works is used and the next
    one takes over if it fails mid-run. The estimate is always the last resort, listed or not.
    """

    idle_w: float = Field(default=3.0, ge=0, description="Whole-device power when idle, W.")
    active_w_per_core: float = Field(
        default=1.5, ge=0, description="Extra power per fully busy core, W."
    )
    meters: list[PowerMethod] = Field(
        default_factory=lambda: [
            PowerMethod.RAPL,
            PowerMethod.HWMON,
            PowerMethod.PMIC,
            PowerMethod.NVML,
            PowerMethod.ESTIMATE,
        ],
        description="Meters to try, in order; the estimate is appended if not listed.",
    )
    meter_idle_w: dict[PowerMethod, float] = Field(
        default_factory=dict,
        description=(
            "Idle power as each meter sees it, W (a RAPL package or a GPU idles well below the "
            "whole device); energy per inference counts only power above it. Default: idle_w."
        ),
    )
    rapl_root: Path = Field(
        default=Path("/sys/class/powercap"), description="The powercap sysfs class (RAPL)."
    )
    hwmon_root: Path = Field(
        default=Path("/sys/class/hwmon"), description="The hwmon sysfs class (INA power rails)."
    )
    hwmon_rails: list[str] | None = Field(
        default=None,
        description=(
            "Rail labels to sum, e.g. [VDD_IN]. Default: the board's total-input rail (VDD_IN, "
            "POM_5V_IN) if there is one, else every rail."
        ),
    )
    vcgencmd: str = Field(
        default="vcgencmd", description="The Raspberry Pi vcgencmd command (Pi 5 PMIC meter)."
    )

    @field_validator("meters")
    @classmethod
    def _no_repeats(cls, meters: list[PowerMethod]) -> list[PowerMethod]:
        repeated = sorted({m.value for m in meters if meters.count(m) > 1})
        if repeated:
            raise ValueError(f"each meter may be listed once; repeated: {', '.join(repeated)}")
        return meters

    def idle_for(self, method: PowerMethod) -> float:
        """Idle power as ``method`` sees it (``meter_idle_w``, else the whole device's)."""
        return self.meter_idle_w.get(method, self.idle_w)


class VibrationInput(Section):
    """The simulated vibration sensor on a rotating machine."""

    type: Literal["vibration"] = "vibration"
    sample_rate_hz: float = Field(default=12800.0, gt=0)
    window: int = Field(default=512, ge=16)
    rpm: float = Field(default=1800.0, gt=0)
    fault: FaultKind = FaultKind.NONE
    severity: float = Field(default=1.0, ge=0)
    seed: int | None = None


class MqttInput(Section):
    """Windows published on a topic of the local broker (a PLC bridge, a sensor gateway)."""

    type: Literal["mqtt"] = "mqtt"
    topic: str = Field(description="Topic carrying SensorReading JSON or a bare JSON array.")
    broker: BrokerConfig | None = Field(
        default=None, description="A local broker for sensor data; default: the fleet broker."
    )
    queue: int = Field(default=64, ge=1, description="Readings buffered; the oldest is dropped.")


InputConfig = Annotated[VibrationInput | MqttInput, Field(discriminator="type")]


class InferenceConfig(Section):
    """How often to run the model on the input source."""

    rate_hz: float = Field(default=10.0, gt=0, le=10000)
    threads: int = Field(default=1, ge=1, le=64, description="Runtime intra-op threads.")
    publish_results: bool = True


class TelemetryConfig(Section):
    interval_s: float = Field(default=5.0, gt=0, description="Length of a telemetry window.")


class FallbackConfig(Section):
    """When the fallback chain moves down a tier, and when it tries to move back up.

    Down: ``errors_to_fall`` failed inferences in a row, ``latency_breaches_to_fall``
    inferences in a row over ``latency_budget_ms``, ``power_windows_to_fall`` telemetry windows
    in a row over ``power_budget_w``, or more than ``restart_budget`` unclean restarts in a
    row (a crash loop). Up: a probe of the next tier after ``probe_after_s`` below it; a probe
    that falls again doubles the wait (up to ``probe_max_s``), one that lasts ``probe_confirm_s``
    resets it.
    """

    errors_to_fall: int = Field(default=3, ge=1, description="Failed inferences in a row.")
    latency_budget_ms: float | None = Field(
        default=None, gt=0, description="Per-inference latency budget; none: not checked."
    )
    latency_breaches_to_fall: int = Field(default=5, ge=1)
    power_budget_w: float | None = Field(
        default=None, gt=0, description="Mean device power budget per window; none: unchecked."
    )
    power_windows_to_fall: int = Field(default=3, ge=1)
    probe_after_s: float = Field(default=30.0, gt=0, description="Wait below before a probe.")
    probe_max_s: float = Field(default=600.0, gt=0, description="Cap of the doubling wait.")
    probe_confirm_s: float = Field(default=10.0, gt=0, description="A probe that lasts wins.")
    restart_budget: int = Field(
        default=3, ge=0, description="Unclean restarts in a row before starting a tier lower."
    )
    healthy_after_s: float = Field(
        default=60.0, gt=0, description="Serving this long without a fall ends a crash loop."
    )
    staging_latency_factor: float = Field(
        default=20.0,
        gt=1,
        description="Staging rejects a model slower than this many times its profiled p50.",
    )


class AgentConfig(Section):
    """Everything the agent needs to run on one device."""

    device_id: DeviceId
    device_class: str = Field(
        default="generic", max_length=64, description="Hardware class (device_configs/)."
    )
    labels: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=64)]] = (
        Field(default_factory=dict, max_length=32, description="e.g. site, line (64 chars).")
    )
    state_dir: Path = Field(default=Path("./agent-state"), description="Models and state.")
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    input: InputConfig = Field(default_factory=VibrationInput)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    power: PowerConfig = Field(default_factory=PowerConfig)
    fallback: FallbackConfig = Field(default_factory=FallbackConfig)
    controller_keys: list[str] = Field(
        default_factory=list,
        description="Enrolled controller signing keys (hex, from keys/signing.pub). When set, "
        "every deploy must carry a manifest signed by one of them.",
    )

    @field_validator("controller_keys")
    @classmethod
    def _keys_are_ed25519_public_keys(cls, keys: list[str]) -> list[str]:
        return _check_keys(keys)


def _check_keys(keys: list[str]) -> list[str]:
    from agent.verify import load_public_key

    for key in keys:
        load_public_key(key)  # ValueError says what a key must look like
    return keys


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``GREENFLEET_AGENT__A__B=value`` set at ``raw[a][b]``."""
    result: dict[str, Any] = dict(raw)
    for key, value in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = result
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        try:
            node[path[-1]] = yaml.safe_load(value) if value else value
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            raise ConfigError(
                f"environment variable {key} is not a valid YAML value: {str(exc)[:200]}"
            ) from exc
    return result


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, override and validate the agent's YAML config; ConfigError says what to fix."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not {type(raw).__name__}")
    raw = apply_env_overrides(raw, os.environ if environ is None else environ)
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid config {path}: {problems}") from exc
    if "\0" in str(config.state_dir):
        raise ConfigError(f"invalid config {path}: state_dir contains a NUL character")
    if not config.state_dir.is_absolute():
        config.state_dir = (path.parent / config.state_dir).resolve()
    # TLS files named relative to the config file, like state_dir. Whether they can be read,
    # and whether plain TCP is allowed, is checked at start (agent.link.check_transport).
    for broker in (config.broker, getattr(config.input, "broker", None)):
        if broker is not None and broker.tls is not None:
            broker.tls = broker.tls.resolved(path.parent)
    return config
