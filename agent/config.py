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
from typing import Annotated, Any

import msgspec
import yaml
from msgspec import Meta, Struct, field

from agent.errors import ConfigError
from agent.protocol import DeviceId, FaultKind, PowerMethod, reason_of

ENV_PREFIX = "GREENFLEET_AGENT__"


class Section(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: a misspelt key is an error, not a silent default.

    Checked when the file is loaded (:func:`load_config`, through msgspec), not when code
    builds a section: a test or a tool that builds one passes its own values.
    """


class TlsConfig(Section, kw_only=True):
    """TLS to the broker: the CA to pin and, for certificate auth, this device's certificate.

    ``ca_file``: PEM CA that signed the broker's certificate (pinned); ``cert_file`` and
    ``key_file`` (mode 0600): the PEM client certificate and key; ``server_name``: the name to
    check the broker certificate against (default: the host).
    """

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without cert_file (the client certificate)")

    def resolved(self, base: Path) -> TlsConfig:
        """A copy with relative file paths taken from ``base`` (the config file's folder)."""
        return msgspec.structs.replace(
            self,
            **{
                key: (base / value).resolve()
                for key in ("ca_file", "cert_file", "key_file")
                if (value := getattr(self, key)) is not None and not value.is_absolute()
            },
        )


Seconds = Annotated[float, Meta(gt=0)]


class BrokerConfig(Section, kw_only=True):
    """Where the site's MQTT broker is and how to log in.

    Without ``tls`` the connection is plain TCP, which is refused for a broker that is not on
    loopback unless ``allow_plaintext`` says so (and then warned about at every start).
    Reconnects wait ``reconnect_min_s`` first, doubling up to ``reconnect_max_s``.
    """

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    allow_plaintext: bool = False
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30
    reconnect_min_s: Seconds = 0.5
    reconnect_max_s: Seconds = 30.0


def _all_meters() -> list[PowerMethod]:
    return [
        PowerMethod.RAPL,
        PowerMethod.HWMON,
        PowerMethod.PMIC,
        PowerMethod.NVML,
        PowerMethod.ESTIMATE,
    ]


class PowerConfig(Section, kw_only=True):
    """Which power meters to try, where they read, and the profile figures for the estimate.

    Meters are tried in ``meters`` order at start (each once; the estimate is appended if not
    listed); the first that works is used and the next one takes over if it fails mid-run. The
    estimate is always the last resort, listed or not.

    - ``idle_w``: whole-device power when idle, W; ``active_w_per_core``: extra power per fully
      busy core, W.
    - ``meter_idle_w``: idle power as each meter sees it, W (a RAPL package or a GPU idles
      well below the whole device); energy per inference counts only power above it.
      Default: ``idle_w``.
    - ``rapl_root``, ``hwmon_root``: the powercap (RAPL) and hwmon (INA power rails) sysfs
      classes; ``hwmon_rails``: rail labels to sum, e.g. [VDD_IN] (default: the board's
      total-input rail, VDD_IN or POM_5V_IN, if there is one, else every rail);
      ``vcgencmd``: the Raspberry Pi command (Pi 5 PMIC meter).
    """

    idle_w: Annotated[float, Meta(ge=0)] = 3.0
    active_w_per_core: Annotated[float, Meta(ge=0)] = 1.5
    meters: list[PowerMethod] = field(default_factory=_all_meters)
    meter_idle_w: dict[PowerMethod, float] = field(default_factory=dict)
    rapl_root: Path = Path("/sys/class/powercap")
    hwmon_root: Path = Path("/sys/class/hwmon")
    hwmon_rails: list[str] | None = None
    vcgencmd: str = "vcgencmd"

    def __post_init__(self) -> None:
        meters = self.meters
        repeated = sorted({m.value for m in meters if meters.count(m) > 1})
        if repeated:
            raise ValueError(
                f"meters: each meter may be listed once; repeated: {', '.join(repeated)}"
            )

    def idle_for(self, method: PowerMethod) -> float:
        """Idle power as ``method`` sees it (``meter_idle_w``, else the whole device's)."""
        return self.meter_idle_w.get(method, self.idle_w)


class VibrationInput(Section, kw_only=True, tag_field="type", tag="vibration"):
    """The simulated vibration sensor on a rotating machine (``type: vibration``)."""

    sample_rate_hz: Annotated[float, Meta(gt=0)] = 12800.0
    window: Annotated[int, Meta(ge=16)] = 512
    rpm: Annotated[float, Meta(gt=0)] = 1800.0
    fault: FaultKind = FaultKind.NONE
    severity: Annotated[float, Meta(ge=0)] = 1.0
    seed: int | None = None

    @property
    def type(self) -> str:
        return "vibration"


class MqttInput(Section, kw_only=True, tag_field="type", tag="mqtt"):
    """Windows published on a topic of the local broker (a PLC bridge, a sensor gateway),
    ``type: mqtt``: SensorReading JSON or a bare JSON array on ``topic``, from ``broker`` (a
    local broker for sensor data; default: the fleet broker), ``queue`` readings buffered (the
    oldest is dropped)."""

    topic: str
    broker: BrokerConfig | None = None
    queue: Annotated[int, Meta(ge=1)] = 64

    @property
    def type(self) -> str:
        return "mqtt"


InputConfig = VibrationInput | MqttInput  # tagged by ``type``


class InferenceConfig(Section, kw_only=True):
    """How often to run the model on the input source, with how many runtime intra-op
    threads, and whether to publish every result."""

    rate_hz: Annotated[float, Meta(gt=0, le=10000)] = 10.0
    threads: Annotated[int, Meta(ge=1, le=64)] = 1
    publish_results: bool = True


class TelemetryConfig(Section, kw_only=True):
    interval_s: Seconds = 5.0  # the length of a telemetry window


class FallbackConfig(Section, kw_only=True):
    """When the fallback chain moves down a tier, and when it tries to move back up.

    Down: ``errors_to_fall`` failed inferences in a row, ``latency_breaches_to_fall``
    inferences in a row over ``latency_budget_ms``, ``power_windows_to_fall`` telemetry windows
    in a row over ``power_budget_w`` (budgets: none, not checked), or more than
    ``restart_budget`` unclean restarts in a row (a crash loop; serving ``healthy_after_s``
    without a fall ends it). Up: a probe of the next tier after ``probe_after_s`` below it; a
    probe that falls again doubles the wait (up to ``probe_max_s``), one that lasts
    ``probe_confirm_s`` resets it. Staging rejects a model slower than
    ``staging_latency_factor`` times its profiled p50.
    """

    errors_to_fall: Annotated[int, Meta(ge=1)] = 3
    latency_budget_ms: Annotated[float, Meta(gt=0)] | None = None
    latency_breaches_to_fall: Annotated[int, Meta(ge=1)] = 5
    power_budget_w: Annotated[float, Meta(gt=0)] | None = None
    power_windows_to_fall: Annotated[int, Meta(ge=1)] = 3
    probe_after_s: Seconds = 30.0
    probe_max_s: Seconds = 600.0
    probe_confirm_s: Seconds = 10.0
    restart_budget: Annotated[int, Meta(ge=0)] = 3
    healthy_after_s: Seconds = 60.0
    staging_latency_factor: Annotated[float, Meta(gt=1)] = 20.0


Label = Annotated[str, Meta(max_length=64)]


class AgentConfig(Section, kw_only=True):
    """Everything the agent needs to run on one device.

    ``device_class``: its hardware class (device_configs/); ``labels``: e.g. site, line (up to
    32, 64 characters each); ``state_dir``: models and state; ``controller_keys``: the enrolled
    controller signing keys (hex, from keys/signing.pub): when set, every deploy must carry a
    manifest signed by one of them.
    """

    device_id: DeviceId
    device_class: Annotated[str, Meta(max_length=64)] = "generic"
    labels: Annotated[dict[Label, Label], Meta(max_length=32)] = field(default_factory=dict)
    state_dir: Path = Path("./agent-state")
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    input: InputConfig = field(default_factory=VibrationInput)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    power: PowerConfig = field(default_factory=PowerConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    controller_keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            _check_keys(self.controller_keys)
        except ValueError as exc:
            raise ValueError(f"controller_keys: {exc}") from exc


def _path(kind: type, value: Any) -> Any:
    """msgspec's hook for the one type it does not know: paths are strings in the file."""
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise TypeError(f"Expected a path (text), got `{type(value).__name__}`")


def _check_text(node: Any, where: str = "") -> None:
    """Refuse text that is not valid UTF-8 (a lone surrogate from an escaped YAML string):
    it would pass as a str and fail later, in a file name or on the wire."""
    if isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where or 'config'}: text is not valid UTF-8") from None
    elif isinstance(node, Mapping):
        for key, value in node.items():
            _check_text(key, where)
            _check_text(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_text(value, f"{where}[{i}]")


def parse_config(raw: Mapping[str, Any]) -> AgentConfig:
    """Check plain values (a parsed YAML file) as an AgentConfig; ValueError says where and what."""
    _check_text(raw)
    try:
        return msgspec.convert(raw, AgentConfig, dec_hook=_path)
    except msgspec.ValidationError as exc:
        raise ValueError(reason_of(exc)) from exc


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
        config = parse_config(raw)
    except ValueError as exc:
        raise ConfigError(f"invalid config {path}: {exc}") from exc
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
