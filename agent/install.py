"""``greenfleet-agent install BUNDLE`` and ``uninstall``: put an enrolled agent on a device.

``install`` reads the enrollment bundle that ``greenfleet devices add`` wrote (agent.enrollment)
and writes, under ``--root`` (default ``/``):

- the agent config, ``/etc/greenfleet/agent.yaml`` (0600, owned by the service user);
- the TLS files, ``/etc/greenfleet/tls/``: ``ca.pem`` (the pinned CA, 0644) and, for
  certificate auth, ``client.pem`` (0644) and ``client.key`` (0600, owned by the service user);
- a systemd unit, ``/etc/systemd/system/greenfleet-agent.service``: a dedicated user, a state
  directory, a sandbox, and a restart policy with a budget.

``--user`` installs a user service instead, which needs no root: the config under
``~/.config/greenfleet``, the state under ``~/.local/state/greenfleet`` and the unit under
``~/.config/systemd/user`` (XDG_CONFIG_HOME / XDG_STATE_HOME are honoured).

Nothing is started: the command prints what it wrote and what to run next, saying which
steps need root. ``--dry-run`` prints every file it would write (secrets masked) and writes
nothing. An existing config, unit or key is never replaced without ``--force``.

Paths inside the written files are the installed system's (``/etc/greenfleet/...``), so
``--root`` can stage an image; the files themselves go under ``--root``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec
import yaml

from agent.config import parse_config
from agent.enrollment import Bundle
from agent.errors import AgentError
from agent.link import is_loopback
from agent.protocol import reason_of

UNIT_NAME = "greenfleet-agent.service"
SERVICE = "greenfleet-agent"
DEFAULT_SERVICE_USER = "greenfleet"
SYSTEM_STATE_ROOT = PurePosixPath("/var/lib")
MASK = "********"
# Restart budget: systemd gives up (the unit is "failed") after this many starts in the
# interval. The agent's own crash-loop budget (fallback.restart_budget, 3 unclean restarts in
# a row) starts it a tier lower first, so a crashing model is survived well within it.
START_LIMIT_INTERVAL_S = 300
START_LIMIT_BURST = 10
RESTART_SEC = 5
# Exit codes of greenfleet-agent run that a restart cannot fix (agent.cli): a bad config, and
# credentials the broker refuses.
NO_RESTART_CODES = "2 3"
_USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,30}\$?$")
_STATE_MARKERS = ("outbox.db", "runs.json", "models", "active.json", "controller")


class InstallError(AgentError):
    """The bundle or the target cannot be used; the message says what to do."""


# -- where things go ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where an install puts its files; paths as the installed system sees them."""

    root: Path  # where the files are written: "/" for a real install, a folder to stage one
    user_mode: bool
    config_dir: PurePosixPath
    state_dir: PurePosixPath
    unit_dir: PurePosixPath

    @property
    def config_path(self) -> PurePosixPath:
        return self.config_dir / "agent.yaml"

    @property
    def tls_dir(self) -> PurePosixPath:
        return self.config_dir / "tls"

    @property
    def unit_path(self) -> PurePosixPath:
        return self.unit_dir / UNIT_NAME

    def on_disk(self, path: PurePosixPath) -> Path:
        """Where ``path`` of the installed system is under ``root``."""
        return self.root.joinpath(*path.parts[1:]) if path.is_absolute() else self.root / path

    @property
    def staged(self) -> bool:
        return self.root.resolve() != Path("/")


def _absolute(text: str | os.PathLike[str], what: str) -> PurePosixPath:
    path = PurePosixPath(os.fspath(text))
    if not path.is_absolute():
        raise InstallError(f"{what} must be an absolute path, not {text}")
    if "\0" in str(path) or "\n" in str(path):
        raise InstallError(f"{what} contains a control character")
    return path


def system_layout(root: Path = Path("/"), state_dir: str | None = None) -> Layout:
    return Layout(
        root=root,
        user_mode=False,
        config_dir=PurePosixPath("/etc/greenfleet"),
        state_dir=_absolute(state_dir or "/var/lib/greenfleet", "--state-dir"),
        unit_dir=PurePosixPath("/etc/systemd/system"),
    )


def user_layout(
    root: Path = Path("/"),
    state_dir: str | None = None,
    home: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Layout:
    env = os.environ if environ is None else environ
    home_dir = _absolute(home or Path.home(), "the home directory")
    config_home = PurePosixPath(env.get("XDG_CONFIG_HOME") or home_dir / ".config")
    state_home = PurePosixPath(env.get("XDG_STATE_HOME") or home_dir / ".local" / "state")
    return Layout(
        root=root,
        user_mode=True,
        config_dir=_absolute(config_home, "XDG_CONFIG_HOME") / "greenfleet",
        state_dir=_absolute(state_dir or state_home / "greenfleet", "--state-dir"),
        unit_dir=_absolute(config_home, "XDG_CONFIG_HOME") / "systemd" / "user",
    )


# -- the bundle -----------------------------------------------------------------------------------


def read_bundle(path: Path) -> Bundle:
    """Read and check an enrollment bundle; InstallError says what is wrong with it."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InstallError(f"cannot read bundle {path}: {why}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InstallError(
            f"{path} is not valid YAML, so not an enrollment bundle (was it cut short in "
            f"transfer?): {str(exc)[:300]}"
        ) from exc
    if not isinstance(raw, dict) or raw.get("kind") != "greenfleet-enrollment":
        raise InstallError(
            f"{path} is not a greenfleet enrollment bundle (no 'kind: greenfleet-enrollment'); "
            "make one on the controller with `greenfleet devices add ID --profile CLASS ...`"
        )
    if raw.get("version") != 1:
        raise InstallError(
            f"{path} is an enrollment bundle of version {raw.get('version')!r}; this agent reads "
            "version 1: upgrade the agent, or make the bundle with a controller of this release"
        )
    try:
        bundle = msgspec.convert(raw, Bundle)
    except msgspec.ValidationError as exc:
        raise InstallError(f"{path}: invalid enrollment bundle: {reason_of(exc)}") from exc
    _check_credentials(bundle, path)
    return bundle


def _check_credentials(bundle: Bundle, path: Path) -> None:
    broker = bundle.broker
    if (broker.cert_pem is None) != (broker.key_pem is None):
        raise InstallError(
            f"{path}: broker.cert_pem and broker.key_pem come together (certificate auth); "
            "the bundle has only one of them"
        )
    if broker.cert_pem is not None and broker.ca_pem is None:
        raise InstallError(f"{path}: a client certificate without broker.ca_pem (TLS) is useless")
    if broker.ca_pem is None and not broker.allow_plaintext and not is_loopback(broker.host):
        raise InstallError(
            f"{path}: the broker {broker.host} is not on loopback and the bundle has no CA "
            "(broker.ca_pem) for TLS: the agent would refuse to connect over plain TCP. Make the "
            "bundle with the broker's TLS CA (or allow plain TCP explicitly when making it)"
        )
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:  # the agent extra brings cryptography; without it, the agent checks later
        return
    if broker.ca_pem is not None:
        try:
            x509.load_pem_x509_certificates(broker.ca_pem.encode())
        except ValueError as exc:
            raise InstallError(f"{path}: broker.ca_pem is not a PEM certificate ({exc})") from exc
    if broker.cert_pem is not None and broker.key_pem is not None:
        try:
            cert = x509.load_pem_x509_certificate(broker.cert_pem.encode())
        except ValueError as exc:
            raise InstallError(f"{path}: broker.cert_pem is not a PEM certificate ({exc})") from exc
        try:
            key = serialization.load_pem_private_key(broker.key_pem.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise InstallError(
                f"{path}: broker.key_pem is not an unencrypted PEM private key ({exc})"
            ) from exc
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        encoding = serialization.Encoding.PEM
        if cert.public_key().public_bytes(encoding, public) != key.public_key().public_bytes(
            encoding, public
        ):
            raise InstallError(f"{path}: broker.key_pem is not the key of broker.cert_pem")


# -- what gets written ----------------------------------------------------------------------------


@dataclass
class PlannedFile:
    """One file of an install: where (installed system's path), mode, contents."""

    path: PurePosixPath
    mode: int
    content: str
    shown: str  # the contents to print: secrets masked
    service_owned: bool = False  # readable by the service user only: chown to it


@dataclass
class Plan:
    layout: Layout
    bundle: Bundle
    service_user: str | None  # None in user mode
    python: str
    files: list[PlannedFile] = field(default_factory=list)
    dirs: list[tuple[PurePosixPath, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def file(self, name: str) -> PlannedFile:
        return next(f for f in self.files if f.path.name == name)

    @property
    def state_directory(self) -> str | None:
        """``StateDirectory=`` for the unit: the state dir relative to /var/lib, if it is
        there (system mode); systemd then creates it, owned by the service user."""
        if self.layout.user_mode:
            return None
        try:
            relative = self.layout.state_dir.relative_to(SYSTEM_STATE_ROOT)
        except ValueError:
            return None
        return str(relative) if relative.parts else None


def config_document(bundle: Bundle, layout: Layout) -> dict[str, Any]:
    """The agent config an install writes, as a mapping (validated as an AgentConfig)."""
    broker: dict[str, Any] = {"host": bundle.broker.host, "port": bundle.broker.port}
    if bundle.broker.username is not None:
        broker["username"] = bundle.broker.username
    if bundle.broker.password is not None:
        broker["password"] = bundle.broker.password
    if bundle.broker.ca_pem is not None:
        tls: dict[str, str] = {"ca_file": str(layout.tls_dir / "ca.pem")}
        if bundle.broker.cert_pem is not None:
            tls["cert_file"] = str(layout.tls_dir / "client.pem")
            tls["key_file"] = str(layout.tls_dir / "client.key")
        broker["tls"] = tls
    if bundle.broker.allow_plaintext:
        broker["allow_plaintext"] = True
    document: dict[str, Any] = {
        "device_id": bundle.device_id,
        "device_class": bundle.device_class,
        "labels": dict(bundle.labels),
        "state_dir": str(layout.state_dir),
        "broker": broker,
        "controller_keys": list(bundle.controller_keys),
    }
    if bundle.power:
        document["power"] = dict(bundle.power)
    try:
        parse_config(document)
    except ValueError as exc:
        raise InstallError(f"the bundle does not make a valid agent config: {exc}") from exc
    return document


def _config_text(document: dict[str, Any], bundle: Bundle, source: str) -> str:
    header = (
        f"# greenfleet agent config for {bundle.device_id}, written by "
        f"`greenfleet-agent install` from {source}.\n"
        "# Any key can be overridden from the environment: GREENFLEET_AGENT__BROKER__HOST=...\n"
        "# input: the simulated vibration sensor unless set, e.g. "
        "input: {type: mqtt, topic: plc/line1/vib}\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def _unit_arg(text: str) -> str:
    """One word of a unit file line: specifiers and variables escaped, quoted if needed."""
    escaped = text.replace("%", "%%").replace("$", "$$")
    if re.search(r"[\s\"'\\;]", escaped):
        return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def unit_text(plan: Plan) -> str:
    layout, bundle = plan.layout, plan.bundle
    exec_start = " ".join(
        _unit_arg(a)
        for a in (plan.python, "-m", "agent.cli", "run", "--config", str(layout.config_path))
    )
    lines = [
        f"# Written by `greenfleet-agent install` for device {bundle.device_id}.",
        "# Remove with `greenfleet-agent uninstall" + (" --user`." if layout.user_mode else "`."),
        "[Unit]",
        f"Description=greenfleet edge agent ({bundle.device_id})",
    ]
    if not layout.user_mode:  # the user manager has no network-online.target
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += [
        "# Restart budget: at most StartLimitBurst starts in StartLimitIntervalSec, then systemd",
        "# stops trying. The agent's own crash-loop budget (fallback.restart_budget: unclean",
        "# restarts in a row) starts it a fallback tier lower well before that.",
        f"StartLimitIntervalSec={START_LIMIT_INTERVAL_S}",
        f"StartLimitBurst={START_LIMIT_BURST}",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_start}",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if not layout.user_mode:
        assert plan.service_user is not None
        lines += [f"User={plan.service_user}", f"Group={plan.service_user}"]
        if plan.state_directory is not None:
            lines += [
                f"StateDirectory={_unit_arg(plan.state_directory)}",
                "StateDirectoryMode=0700",
            ]
    lines += [
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        "# 2: bad config, 3: the broker refused the credentials; a restart cannot fix either.",
        f"RestartPreventExitStatus={NO_RESTART_CODES}",
        "NoNewPrivileges=yes",
    ]
    if not layout.user_mode:
        lines += [
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            f"ReadWritePaths={_unit_arg(str(layout.state_dir))}",
        ]
    lines += [
        "",
        "[Install]",
        f"WantedBy={'default.target' if layout.user_mode else 'multi-user.target'}",
    ]
    return "\n".join(lines) + "\n"


def plan_install(
    bundle: Bundle,
    layout: Layout,
    *,
    service_user: str | None = None,
    python: str | None = None,
    source: str = "an enrollment bundle",
) -> Plan:
    """Everything an install writes, without writing it."""
    if layout.user_mode:
        if service_user is not None:
            raise InstallError(
                "--service-user does not apply to --user: a user service runs as you"
            )
        user = None
    else:
        user = service_user or DEFAULT_SERVICE_USER
        if not _USER_NAME.match(user):
            raise InstallError(f"--service-user {user!r} is not a valid user name")
    plan = Plan(layout, bundle, user, python or sys.executable)
    document = config_document(bundle, layout)
    shown = dict(document, broker=dict(document["broker"]))
    if "password" in shown["broker"]:
        shown["broker"]["password"] = MASK
    dir_mode = 0o700 if layout.user_mode else 0o755
    plan.dirs = [(layout.config_dir, dir_mode), (layout.unit_dir, 0o755)]
    plan.files.append(
        PlannedFile(
            layout.config_path,
            0o600,
            _config_text(document, bundle, source),
            _config_text(shown, bundle, source),
            service_owned=True,
        )
    )
    broker = bundle.broker
    if broker.ca_pem is not None:
        plan.dirs.insert(1, (layout.tls_dir, dir_mode))
        ca = _pem(broker.ca_pem)
        plan.files.append(PlannedFile(layout.tls_dir / "ca.pem", 0o644, ca, ca))
        if broker.cert_pem is not None and broker.key_pem is not None:
            cert = _pem(broker.cert_pem)
            plan.files.append(PlannedFile(layout.tls_dir / "client.pem", 0o644, cert, cert))
            plan.files.append(
                PlannedFile(
                    layout.tls_dir / "client.key",
                    0o600,
                    _pem(broker.key_pem),
                    f"<private key, {len(broker.key_pem)} characters, masked>\n",
                    service_owned=True,
                )
            )
    unit = unit_text(plan)
    plan.files.append(PlannedFile(layout.unit_path, 0o644, unit, unit))
    if not layout.user_mode:
        hidden = [p for p in (plan.python, _agent_location()) if _under_home(p)]
        if hidden:
            plan.warnings.append(
                f"the agent ({', '.join(hidden)}) is under /home or /root, which the unit's "
                "ProtectHome=yes hides from the service: it would not start. Install the agent "
                "outside home (python3 -m venv /opt/greenfleet && /opt/greenfleet/bin/pip "
                "install 'greenfleet[agent]', then run that greenfleet-agent install), or use "
                "--user"
            )
    return plan


def _pem(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _agent_location() -> str:
    import agent

    return str(Path(agent.__file__).resolve().parent)


def _under_home(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return len(parts) > 1 and parts[1] in ("home", "root")


def check_python(python: str) -> str | None:
    """Why ``python -m agent.cli`` would not work from a service (no cwd, no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        done = subprocess.run(
            [python, "-c", "import agent.cli"],
            cwd="/",
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python}: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return (
            f"{python} cannot import the agent outside this folder ({last}); the service would "
            "not start. Install the package (pip install 'greenfleet[agent]') into that Python"
        )
    return None


# -- writing ------------------------------------------------------------------------------------


def _euid() -> int:
    return os.geteuid()


def lookup_user(name: str) -> tuple[int, int] | None:
    """(uid, gid) of ``name``, or None if there is no such user."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _write_file(path: Path, content: str, mode: int) -> None:
    """Write atomically, with ``mode`` from the first byte (never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask does not get a say
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@dataclass
class Outcome:
    """What an install did and what is left to do."""

    written: list[tuple[Path, int, str]] = field(default_factory=list)  # path, mode, owner
    removed: list[Path] = field(default_factory=list)
    root_steps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def conflicts(plan: Plan) -> list[Path]:
    """Files of the plan that exist already (a config, a unit or keys of an earlier install)."""
    layout = plan.layout
    names = [f.path for f in plan.files] + [
        layout.tls_dir / n for n in ("ca.pem", "client.pem", "client.key")
    ]
    return sorted({layout.on_disk(p) for p in names if layout.on_disk(p).exists()})


def apply_plan(plan: Plan, *, force: bool = False) -> Outcome:
    """Write the plan's files; InstallError (naming the file) for anything in the way."""
    layout = plan.layout
    existing = conflicts(plan)
    if existing and not force:
        raise InstallError(
            "refusing to overwrite "
            + ", ".join(str(p) for p in existing)
            + ": already installed? Remove it with `greenfleet-agent uninstall"
            + (" --user" if layout.user_mode else "")
            + "` first, or add --force to replace these files"
        )
    outcome = Outcome()
    try:
        for directory, mode in plan.dirs:
            target = layout.on_disk(directory)
            if not target.exists():
                target.mkdir(parents=True, mode=mode)
                os.chmod(target, mode)
        for planned in plan.files:
            target = layout.on_disk(planned.path)
            _write_file(target, planned.content, planned.mode)
        if force:  # keys of an earlier certificate-auth install that this one does not use
            planned_paths = {layout.on_disk(f.path) for f in plan.files}
            for stale in existing:
                if stale not in planned_paths:
                    stale.unlink()
                    outcome.removed.append(stale)
        state_on_disk = layout.on_disk(layout.state_dir)
        if plan.state_directory is None and not state_on_disk.exists():
            state_on_disk.mkdir(parents=True, mode=0o700)
            os.chmod(state_on_disk, 0o700)
    except PermissionError as exc:
        raise InstallError(
            f"cannot write {exc.filename or layout.root}: permission denied. A system install "
            "needs root: run it with sudo, or use --user to install a user service "
            "(no root needed)"
        ) from exc
    except OSError as exc:
        raise InstallError(f"cannot write {exc.filename or layout.root}: {exc.strerror}") from exc
    _own(plan, outcome)
    return outcome


def _ownership(plan: Plan) -> tuple[tuple[int, int] | None, list[str], list[str]]:
    """(uid/gid to chown to now, or None; notes; root steps) for the service user's files."""
    layout = plan.layout
    if layout.user_mode:
        return None, [], []
    user = plan.service_user
    assert user is not None
    ids = lookup_user(user)
    if ids is not None and _euid() == 0:
        return ids, [], []
    paths = [str(layout.on_disk(f.path)) for f in plan.files if f.service_owned]
    if plan.state_directory is None:  # systemd makes and owns only a StateDirectory= itself
        paths.append(str(layout.on_disk(layout.state_dir)))
    why = (
        f"the user {user} does not exist yet"
        if ids is None
        else f"not running as root, so the files could not be given to {user}"
    )
    note = (
        f"{why}: {', '.join(paths)} must be owned by {user} before the service starts "
        "(see the next steps)"
    )
    return None, [note], [f"chown {user}:{user} {' '.join(_sh(p) for p in paths)}"]


def _own(plan: Plan, outcome: Outcome) -> None:
    """Give the service user its files; say what could not be done and how to do it."""
    layout = plan.layout
    ids, outcome.notes, outcome.root_steps = _ownership(plan)
    if ids is not None:
        for planned in plan.files:
            if planned.service_owned:
                os.chown(layout.on_disk(planned.path), *ids)
        if plan.state_directory is None:
            os.chown(layout.on_disk(layout.state_dir), *ids)
    for planned in plan.files:
        outcome.written.append((layout.on_disk(planned.path), planned.mode, _owner(plan, planned)))


def _owner(plan: Plan, planned: PlannedFile) -> str:
    if plan.layout.user_mode:
        return "you"
    ids, _, _ = _ownership(plan)
    if planned.service_owned and ids is not None:
        return str(plan.service_user)
    return "root" if _euid() == 0 else "you"


def _sh(text: str) -> str:
    return shlex.quote(text)


def next_steps(plan: Plan) -> tuple[list[str], list[str]]:
    """(steps that need root, steps that do not), in order."""
    layout = plan.layout
    root_steps: list[str] = []
    steps: list[str] = []
    if layout.user_mode:
        steps += [
            "systemctl --user daemon-reload",
            f"systemctl --user enable --now {SERVICE}",
            f"systemctl --user status {SERVICE}",
            f"journalctl --user -u {SERVICE} -f",
        ]
        me = os.environ.get("USER") or "$USER"
        root_steps.append(
            f"loginctl enable-linger {me}   # keep the agent running while you are logged "
            "out and start it at boot (root, or your polkit rules, may allow it without)"
        )
        return root_steps, steps
    user = str(plan.service_user)
    if lookup_user(user) is None:
        root_steps.append(
            "useradd --system --user-group --no-create-home "
            f"--home-dir {_sh(str(layout.state_dir))} --shell /usr/sbin/nologin {user}"
        )
    root_steps += _ownership(plan)[2]
    root_steps += ["systemctl daemon-reload", f"systemctl enable --now {SERVICE}"]
    steps += [f"systemctl status {SERVICE}", f"journalctl -u {SERVICE} -f"]
    return root_steps, steps


# -- the commands ----------------------------------------------------------------------------------


def _header(plan: Plan) -> str:
    bundle, broker = plan.bundle, plan.bundle.broker
    auth = (
        "client certificate"
        if broker.cert_pem
        else ("password" if broker.password is not None else "no credentials")
    )
    transport = "TLS, CA pinned" if broker.ca_pem else "PLAIN TCP"
    labels = ", ".join(f"{k}={v}" for k, v in sorted(bundle.labels.items())) or "none"
    mode = "user service" if plan.layout.user_mode else f"system service, user {plan.service_user}"
    return (
        f"device {bundle.device_id} (class {bundle.device_class}, labels {labels}); broker "
        f"{broker.host}:{broker.port} over {transport}, {auth}; {mode}"
    )


def _print_steps(root_steps: list[str], steps: list[str], bundle_path: str, user: bool) -> None:
    """The next steps, saying which need root (a user install's only root step is optional)."""
    print()
    sections = (
        [("Next (no root needed):", steps), ("Optionally, as root (sudo):", root_steps)]
        if user
        else [("Next, as root (sudo):", root_steps), ("Then, to check it (no root needed):", steps)]
    )
    for heading, items in sections:
        print(heading)
        for step in items:
            print(f"  {step}")
    # the same advice as `greenfleet devices add`: nothing needs the bundle once installed
    # (the controller keeps no use for its copy either), and it holds a password or a key
    print(
        f"Destroy the bundle now, it holds this device's credentials: shred -u {_sh(bundle_path)}"
    )


def install(
    bundle_path: Path,
    layout: Layout,
    *,
    dry_run: bool = False,
    force: bool = False,
    service_user: str | None = None,
    python: str | None = None,
) -> int:
    """``greenfleet-agent install``: 0 when written (or shown), InstallError otherwise."""
    bundle = read_bundle(bundle_path)
    plan = plan_install(
        bundle, layout, service_user=service_user, python=python, source=bundle_path.name
    )
    if python is None:
        problem = check_python(plan.python)
        if problem is not None:
            plan.warnings.append(problem)
    existing = conflicts(plan)
    if dry_run:
        print("greenfleet-agent install --dry-run: nothing is written.")
        print(_header(plan))
        if not (layout.user_mode or layout.staged or _euid() == 0):
            print("NOTE: a system install writes under /etc: run it as root (sudo), or use --user")
        for directory, mode in plan.dirs:
            target = layout.on_disk(directory)
            state = "exists" if target.is_dir() else f"new, mode {mode:04o}"
            print(f"directory {target} ({state})")
        for planned in plan.files:
            owner = (
                "you"
                if layout.user_mode
                else (plan.service_user if planned.service_owned else "root")
            )
            print(f"\n--- {layout.on_disk(planned.path)} (mode {planned.mode:04o}, owner {owner})")
            print(planned.shown, end="")
        for note in _ownership(plan)[1]:
            print(f"\nNOTE: {note}")
        for warning in plan.warnings:
            print(f"\nWARNING: {warning}")
        if existing and not force:
            print(
                "\nA real install would refuse: "
                + ", ".join(str(p) for p in existing)
                + " exist(s); add --force to replace them"
            )
        root_steps, steps = next_steps(plan)
        _print_steps(root_steps, steps, str(bundle_path), layout.user_mode)
        return 1 if existing and not force else 0
    outcome = apply_plan(plan, force=force)
    print(_header(plan))
    for path, mode, owner in outcome.written:
        print(f"wrote {path} (mode {mode:04o}, owner {owner})")
    for path in outcome.removed:
        print(f"removed {path} (not used by this bundle)")
    if layout.staged:
        print(
            f"(files written under {layout.root}; the paths inside them are those of the "
            "installed system)"
        )
    for note in outcome.notes:
        print(f"NOTE: {note}")
    for warning in plan.warnings:
        print(f"WARNING: {warning}")
    root_steps, steps = next_steps(plan)
    _print_steps(root_steps, steps, str(bundle_path), layout.user_mode)
    return 0


def _state_dir_of(layout: Layout) -> PurePosixPath:
    """The state dir the installed config names (it may differ from the default)."""
    with contextlib.suppress(OSError, yaml.YAMLError, TypeError, ValueError):
        raw = yaml.safe_load(layout.on_disk(layout.config_path).read_text())
        if isinstance(raw, dict) and isinstance(raw.get("state_dir"), str):
            path = PurePosixPath(raw["state_dir"])
            if path.is_absolute():
                return path
    return layout.state_dir


def _unit_user(layout: Layout) -> str | None:
    """The User= of the installed unit, if there is one."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in layout.on_disk(layout.unit_path).read_text().splitlines():
            if line.startswith("User="):
                return line.partition("=")[2].strip() or None
    return None


def _safe_to_purge(path: Path, layout: Layout) -> bool:
    """Only a folder that is clearly the agent's state: never /, a home, or a system folder."""
    if not path.is_dir():
        return False
    resolved = path.resolve()
    protected = {layout.root.resolve(), Path.home().resolve()} | {
        (layout.root / d).resolve() for d in ("etc", "var", "var/lib", "usr", "home", "root")
    }
    if resolved in protected:
        return False
    if "greenfleet" in resolved.name:
        return True
    entries = {e.name for e in path.iterdir()}
    return not entries or bool(entries & set(_STATE_MARKERS))


def uninstall(layout: Layout, *, purge: bool = False) -> int:
    """``greenfleet-agent uninstall``: remove the unit, the config and the TLS files (and the
    state with ``purge``); print the systemctl commands that finish the job."""
    state = _state_dir_of(layout)
    service_user = _unit_user(layout)
    targets = [
        layout.unit_path,
        layout.config_path,
        *(layout.tls_dir / n for n in ("ca.pem", "client.pem", "client.key")),
    ]
    removed: list[Path] = []
    try:
        unit_dir = layout.on_disk(layout.unit_dir)
        wants = sorted(unit_dir.glob("*.wants")) if unit_dir.is_dir() else []
        # what `systemctl enable` made; dangling here (it points at the installed system's path)
        links = [w / UNIT_NAME for w in wants if (w / UNIT_NAME).is_symlink()]
        for link in links:
            link.unlink()
            removed.append(link)
        for target in targets:
            path = layout.on_disk(target)
            if path.exists() or path.is_symlink():
                path.unlink()
                removed.append(path)
        for directory in (layout.tls_dir, layout.config_dir):
            path = layout.on_disk(directory)
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
                removed.append(path)
            elif path.is_dir():
                print(f"kept {path}: it holds files this install did not write")
        state_path = layout.on_disk(state)
        if purge and state_path.exists():
            if not _safe_to_purge(state_path, layout):
                raise InstallError(
                    f"not purging {state_path}: it does not look like the agent's state "
                    "directory; remove it yourself if it is"
                )
            shutil.rmtree(state_path)
            removed.append(state_path)
    except PermissionError as exc:
        raise InstallError(
            f"cannot remove {exc.filename}: permission denied"
            + ("" if layout.user_mode else "; a system install is removed as root (sudo)")
        ) from exc
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print("nothing to remove: no greenfleet agent is installed there")
    if not purge and layout.on_disk(state).exists():
        print(
            f"kept the state directory {layout.on_disk(state)} (models, outbox); --purge removes it"
        )
    print()
    if layout.user_mode:
        print("Next (no root needed): stop the running agent and forget the unit:")
        print(f"  systemctl --user stop {SERVICE}")
        print("  systemctl --user daemon-reload")
        print(f"  systemctl --user reset-failed {SERVICE}   # if it had failed")
    else:
        print("Next, as root (sudo): stop the running agent and forget the unit:")
        print(f"  systemctl stop {SERVICE}")
        print("  systemctl daemon-reload")
        print(f"  systemctl reset-failed {SERVICE}   # if it had failed")
        if service_user is not None:
            print(
                f"  userdel {service_user}   # optional: the service user, if nothing else uses it"
            )
    return 0
