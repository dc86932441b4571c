"""``greenfleet-agent install`` / ``uninstall`` into a temporary root: what is written, with
which modes and owners, what is refused, and a unit file that systemd accepts."""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from agent import install as inst
from agent.cli import main
from agent.config import load_config
from agent.install import InstallError, install, system_layout, uninstall, user_layout
from agent.link import tls_context
from tests.tls_ca import TestCA, bundle_document, write_bundle

PASSWORD = "s3cret-pass"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def no_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service user does not exist on this host (whoever runs the tests)."""
    monkeypatch.setattr(inst, "lookup_user", lambda name: None)


@pytest.fixture
def bundle(tmp_path: Path, ca: TestCA) -> Path:
    return write_bundle(tmp_path / "gw-press-01.bundle", bundle_document(ca=ca))


@pytest.fixture
def cert_bundle(tmp_path: Path, ca: TestCA) -> Path:
    client = ca.issue("gw-press-01", client=True)
    document = bundle_document(ca=ca, client=client, password=None)
    return write_bundle(tmp_path / "cert.bundle", document)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def unit_sections(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_dry_run_shows_every_file_masks_secrets_and_writes_nothing(
    tmp_path: Path, bundle: Path, cert_bundle: Path, no_user: None, capsys: Any
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for source in (bundle, cert_bundle):
        assert install(source, system_layout(root), dry_run=True, python=sys.executable) == 0
        out = capsys.readouterr().out
        assert "nothing is written" in out
        for name in ("etc/greenfleet/agent.yaml", "etc/systemd/system/greenfleet-agent.service"):
            assert f"--- {root / name} (mode 0" in out
        assert f"--- {root / 'etc/greenfleet/tls/ca.pem'} (mode 0644, owner root)" in out
        assert "BEGIN CERTIFICATE" in out and "ExecStart=" in out
        assert "PRIVATE KEY" not in out and PASSWORD not in out
    assert f"--- {root / 'etc/greenfleet/tls/client.key'} (mode 0600, owner greenfleet)" in out
    assert "<private key," in out and "masked>" in out
    assert "useradd --system" in out and "systemctl enable --now greenfleet-agent" in out
    assert list(root.iterdir()) == []


def test_dry_run_masks_the_password(
    tmp_path: Path, bundle: Path, no_user: None, capsys: Any
) -> None:
    assert install(bundle, system_layout(tmp_path / "r"), dry_run=True, python=sys.executable) == 0
    out = capsys.readouterr().out
    assert "password: '********'" in out and PASSWORD not in out
    assert not (tmp_path / "r").exists()


def test_install_writes_a_config_that_loads_and_points_at_the_written_tls_files(
    tmp_path: Path, cert_bundle: Path, no_user: None, capsys: Any
) -> None:
    root = tmp_path / "root"
    layout = system_layout(root)
    assert install(cert_bundle, layout, python=sys.executable) == 0
    etc = root / "etc" / "greenfleet"
    assert {p.relative_to(root).as_posix() for p in files_under(root)} == {
        "etc/greenfleet/agent.yaml",
        "etc/greenfleet/tls/ca.pem",
        "etc/greenfleet/tls/client.pem",
        "etc/greenfleet/tls/client.key",
        "etc/systemd/system/greenfleet-agent.service",
    }
    assert mode(etc / "agent.yaml") == 0o600 and mode(etc / "tls" / "client.key") == 0o600
    assert mode(etc / "tls" / "ca.pem") == 0o644 and mode(etc / "tls" / "client.pem") == 0o644

    config = load_config(etc / "agent.yaml", environ={})
    bundle = yaml.safe_load(cert_bundle.read_text())
    assert config.device_id == "gw-press-01" and config.device_class == "rpi4"
    assert config.labels == {"site": "plant-a", "line": "1"}
    assert config.state_dir == Path("/var/lib/greenfleet")
    assert (config.broker.host, config.broker.port) == ("mqtt.plant-a.local", 8883)
    assert config.broker.username == "gw-press-01" and config.broker.password is None
    assert config.controller_keys == bundle["controller_keys"]
    assert (config.power.idle_w, config.power.active_w_per_core) == (2.7, 1.1)
    tls = config.broker.tls
    assert tls is not None and tls.cert_file is not None and tls.key_file is not None
    assert tls.ca_file == Path("/etc/greenfleet/tls/ca.pem")  # the installed system's path
    on_disk = [
        layout.on_disk(inst.PurePosixPath(p)) for p in (tls.ca_file, tls.cert_file, tls.key_file)
    ]
    assert on_disk == [etc / "tls" / n for n in ("ca.pem", "client.pem", "client.key")]
    assert on_disk[0].read_text() == bundle["broker"]["ca_pem"]
    assert on_disk[2].read_text() == bundle["broker"]["key_pem"]
    staged = msgspec.structs.replace(
        tls, **dict(zip(("ca_file", "cert_file", "key_file"), on_disk, strict=True))
    )
    tls_context(staged)  # the CA, certificate and key load, and the key matches the certificate

    out = capsys.readouterr().out
    assert f"wrote {etc / 'agent.yaml'} (mode 0600" in out
    assert "the user greenfleet does not exist yet" in out
    assert "useradd --system --user-group" in out
    assert f"chown greenfleet:greenfleet {etc / 'agent.yaml'} {etc / 'tls' / 'client.key'}" in out
    assert "Next, as root (sudo):" in out and "systemctl daemon-reload" in out


def test_password_install_config(tmp_path: Path, bundle: Path, no_user: None) -> None:
    root = tmp_path / "root"
    assert install(bundle, system_layout(root), python=sys.executable) == 0
    config = load_config(root / "etc/greenfleet/agent.yaml", environ={})
    assert config.broker.password == PASSWORD
    assert config.broker.tls is not None and config.broker.tls.cert_file is None
    assert not (root / "etc/greenfleet/tls/client.key").exists()


def test_as_root_the_service_user_gets_the_config_and_key(
    tmp_path: Path, cert_bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    chowned: list[tuple[str, int, int]] = []
    monkeypatch.setattr(inst, "lookup_user", lambda name: (1234, 2345) if name == "edge" else None)
    monkeypatch.setattr(inst, "_euid", lambda: 0)
    monkeypatch.setattr(inst.os, "chown", lambda p, u, g: chowned.append((Path(p).name, u, g)))
    root = tmp_path / "root"
    assert (
        install(cert_bundle, system_layout(root), service_user="edge", python="/usr/bin/python3")
        == 0
    )
    assert sorted(chowned) == [("agent.yaml", 1234, 2345), ("client.key", 1234, 2345)]
    out = capsys.readouterr().out
    assert "(mode 0600, owner edge)" in out and "useradd" not in out and "chown" not in out
    unit = unit_sections(root / "etc/systemd/system/greenfleet-agent.service")
    assert unit["Service"]["User"] == "edge" and unit["Service"]["Group"] == "edge"


def test_not_as_root_it_says_the_files_could_not_be_given_away(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setattr(inst, "lookup_user", lambda name: (1234, 2345))
    monkeypatch.setattr(inst, "_euid", lambda: 1000)
    assert install(bundle, system_layout(tmp_path / "root"), python=sys.executable) == 0
    out = capsys.readouterr().out
    assert "not running as root, so the files could not be given to greenfleet" in out
    assert "chown greenfleet:greenfleet" in out and "useradd" not in out


def test_the_unit_has_the_user_state_sandbox_and_restart_budget(
    tmp_path: Path, bundle: Path, no_user: None
) -> None:
    root = tmp_path / "root"
    assert install(bundle, system_layout(root), python="/usr/bin/python3") == 0
    unit = unit_sections(root / "etc/systemd/system/greenfleet-agent.service")
    service = unit["Service"]
    assert service["ExecStart"] == (
        "/usr/bin/python3 -m agent.cli run --config /etc/greenfleet/agent.yaml"
    )
    expected = {
        "User": "greenfleet",
        "Group": "greenfleet",
        "StateDirectory": "greenfleet",
        "Restart": "on-failure",
        "RestartSec": "5",
        "RestartPreventExitStatus": "2 3",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ReadWritePaths": "/var/lib/greenfleet",
    }
    assert {k: service[k] for k in expected} == expected
    assert unit["Unit"]["StartLimitIntervalSec"] == "300"
    assert unit["Unit"]["StartLimitBurst"] == "10"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_a_state_dir_outside_var_lib_is_made_and_made_writable(
    tmp_path: Path, bundle: Path, no_user: None, capsys: Any
) -> None:
    root = tmp_path / "root"
    layout = system_layout(root, "/srv/edge state")
    assert install(bundle, layout, python="/opt/gf/bin/python") == 0
    unit = unit_sections(root / "etc/systemd/system/greenfleet-agent.service")
    assert "StateDirectory" not in unit["Service"]
    assert unit["Service"]["ReadWritePaths"] == '"/srv/edge state"'
    assert mode(root / "srv" / "edge state") == 0o700
    assert "'" + str(root / "srv" / "edge state") + "'" in capsys.readouterr().out  # chown it
    config = load_config(root / "etc/greenfleet/agent.yaml", environ={})
    assert config.state_dir == Path("/srv/edge state")


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd); "
    "test_the_unit_has_the_user_state_sandbox_and_restart_budget checks the unit's content",
)
@pytest.mark.parametrize("user_mode", [False, True], ids=["system", "user"])
def test_systemd_analyze_verify_accepts_the_unit(
    tmp_path: Path, bundle: Path, no_user: None, user_mode: bool
) -> None:
    home = tmp_path / "home"
    layout = user_layout(home=home, environ={}) if user_mode else system_layout(tmp_path / "root")
    assert install(bundle, layout, python=sys.executable) == 0
    unit = layout.on_disk(layout.unit_path)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, HOME=str(home), XDG_RUNTIME_DIR=str(runtime), SYSTEMD_LOG_LEVEL="info")
    done = subprocess.run(
        ["systemd-analyze", *(["--user"] if user_mode else []), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    # Warnings (an unknown key, a bad value) go to stderr without failing: accept neither.
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    assert done.returncode == 0 and "greenfleet-agent.service" not in done.stdout, done.stdout


def test_user_mode_needs_no_root_and_keeps_everything_in_home(
    tmp_path: Path, cert_bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setattr(inst, "_euid", lambda: 1000)
    monkeypatch.setattr(inst.os, "chown", lambda *a: pytest.fail("user mode chowned a file"))
    home = tmp_path / "home"
    layout = user_layout(home=home, environ={})
    assert install(cert_bundle, layout, python=sys.executable) == 0
    config_dir = home / ".config" / "greenfleet"
    unit_path = home / ".config" / "systemd" / "user" / "greenfleet-agent.service"
    assert {p.relative_to(home).as_posix() for p in files_under(home)} == {
        ".config/greenfleet/agent.yaml",
        ".config/greenfleet/tls/ca.pem",
        ".config/greenfleet/tls/client.pem",
        ".config/greenfleet/tls/client.key",
        ".config/systemd/user/greenfleet-agent.service",
    }
    assert mode(config_dir) == 0o700 and mode(config_dir / "agent.yaml") == 0o600
    assert mode(home / ".local" / "state" / "greenfleet") == 0o700
    config = load_config(config_dir / "agent.yaml", environ={})
    assert config.state_dir == home / ".local" / "state" / "greenfleet"
    assert config.broker.tls is not None and config.broker.tls.key_file == (
        config_dir / "tls" / "client.key"
    )
    tls_context(config.broker.tls)
    unit = unit_sections(unit_path)
    assert "User" not in unit["Service"] and "ProtectSystem" not in unit["Service"]
    assert unit["Service"]["ExecStart"].endswith(f"run --config {config_dir / 'agent.yaml'}")
    assert unit["Install"]["WantedBy"] == "default.target"
    out = capsys.readouterr().out
    assert "Next (no root needed):" in out
    assert "systemctl --user enable --now greenfleet-agent" in out
    assert "loginctl enable-linger" in out and "useradd" not in out


def test_user_mode_honours_xdg_dirs(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XDG_STATE_HOME": str(tmp_path / "st")}
    layout = user_layout(home=tmp_path / "home", environ=env)
    assert str(layout.config_path) == f"{tmp_path}/cfg/greenfleet/agent.yaml"
    assert str(layout.unit_path) == f"{tmp_path}/cfg/systemd/user/greenfleet-agent.service"
    assert str(layout.state_dir) == f"{tmp_path}/st/greenfleet"


def test_an_existing_install_is_not_overwritten_without_force(
    tmp_path: Path, bundle: Path, cert_bundle: Path, no_user: None, capsys: Any
) -> None:
    root = tmp_path / "root"
    config = root / "etc/greenfleet/agent.yaml"
    assert install(cert_bundle, system_layout(root), python=sys.executable) == 0
    before = config.read_text()
    with pytest.raises(InstallError) as err:
        install(bundle, system_layout(root), python=sys.executable)
    assert f"refusing to overwrite {config}" in str(err.value) and "--force" in str(err.value)
    assert config.read_text() == before
    assert install(bundle, system_layout(root), dry_run=True, python=sys.executable) == 1
    assert "A real install would refuse" in capsys.readouterr().out
    assert install(bundle, system_layout(root), force=True, python=sys.executable) == 0
    assert PASSWORD in config.read_text()
    assert not (root / "etc/greenfleet/tls/client.key").exists()  # the old key went
    assert "removed" in capsys.readouterr().out


def test_uninstall_removes_unit_config_and_keys_and_state_only_with_purge(
    tmp_path: Path, cert_bundle: Path, no_user: None, capsys: Any
) -> None:
    root = tmp_path / "root"
    layout = system_layout(root)
    assert install(cert_bundle, layout, python=sys.executable) == 0
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "greenfleet-agent.service").symlink_to("/etc/systemd/system/greenfleet-agent.service")
    state = root / "var/lib/greenfleet"
    (state / "models").mkdir(parents=True)
    (state / "outbox.db").write_text("x")
    capsys.readouterr()

    assert uninstall(layout) == 0
    out = capsys.readouterr().out
    assert not (root / "etc/greenfleet").exists()
    assert not (root / "etc/systemd/system/greenfleet-agent.service").exists()
    assert not (wants / "greenfleet-agent.service").is_symlink()
    assert state.exists() and "--purge removes it" in out
    assert "systemctl stop greenfleet-agent" in out and "systemctl daemon-reload" in out
    assert "userdel greenfleet" in out

    assert uninstall(layout, purge=True) == 0
    assert not state.exists()
    assert f"removed {state}" in capsys.readouterr().out
    assert uninstall(layout) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_uninstall_keeps_foreign_files_and_will_not_purge_a_strange_state_dir(
    tmp_path: Path, bundle: Path, no_user: None, capsys: Any
) -> None:
    root = tmp_path / "root"
    layout = system_layout(root, "/srv/data")
    assert install(bundle, layout, python=sys.executable) == 0
    (root / "etc/greenfleet/notes.txt").write_text("mine")
    (root / "srv/data/precious.csv").write_text("1,2")
    with pytest.raises(InstallError, match="not purging"):
        uninstall(system_layout(root), purge=True)  # the state dir comes from the config
    assert (root / "srv/data/precious.csv").exists()
    assert (root / "etc/greenfleet/notes.txt").exists()
    assert "kept" in capsys.readouterr().out


def test_user_uninstall(tmp_path: Path, bundle: Path, capsys: Any) -> None:
    layout = user_layout(home=tmp_path / "home", environ={})
    assert install(bundle, layout, python=sys.executable) == 0
    assert uninstall(layout, purge=True) == 0
    assert files_under(tmp_path / "home") == []
    assert "systemctl --user stop greenfleet-agent" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, needle",
    [
        ("broker: [unclosed\n", "is not valid YAML"),
        ("just: a mapping\n", "is not a greenfleet enrollment bundle"),
        ("- a\n- list\n", "is not a greenfleet enrollment bundle"),
        ("kind: greenfleet-enrollment\nversion: 2\n", "of version 2; this agent reads version 1"),
        ("kind: greenfleet-enrollment\nversion: 1\n", "invalid enrollment bundle: device_id"),
    ],
)
def test_bad_bundles_are_named(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(text)
    with pytest.raises(InstallError) as err:
        inst.read_bundle(path)
    assert needle in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda d: d["broker"].update(port=0), "broker.port"),
        (lambda d: d["broker"].pop("ca_pem"), "no CA (broker.ca_pem) for TLS"),
        (lambda d: d["broker"].update(ca_pem="garbage"), "broker.ca_pem is not a PEM"),
        (lambda d: d["broker"].update(cert_pem=d["broker"]["ca_pem"]), "come together"),
        (lambda d: d.update(controller_keys=["abc"]), "controller_keys"),
        (lambda d: d.update(power={"idle_watts": 3}), "power.idle_watts"),
        (lambda d: d.update(device_id="a b"), "device_id"),
    ],
)
def test_bundles_that_cannot_make_a_working_agent_are_refused(
    tmp_path: Path, ca: TestCA, change: Any, needle: str
) -> None:
    document = bundle_document(ca=ca)
    change(document)
    path = write_bundle(tmp_path / "b.yaml", document)
    with pytest.raises(InstallError) as err:
        install(path, system_layout(tmp_path / "root"), python=sys.executable)
    assert needle in str(err.value)
    assert not (tmp_path / "root").exists()


def test_a_client_key_that_is_not_the_certificates_is_refused(tmp_path: Path, ca: TestCA) -> None:
    document = bundle_document(ca=ca, client=ca.issue("a", client=True), password=None)
    document["broker"]["key_pem"] = ca.issue("b", client=True).key_pem
    with pytest.raises(InstallError, match=r"is not the key of broker\.cert_pem"):
        inst.read_bundle(write_bundle(tmp_path / "b.yaml", document))


def test_plaintext_bundles_for_loopback_or_explicitly_allowed(
    tmp_path: Path, no_user: None
) -> None:
    for host, allow in (("127.0.0.1", False), ("mqtt.lan", True)):
        root = tmp_path / host
        document = bundle_document(host=host, port=1883)
        document["broker"]["allow_plaintext"] = allow
        path = write_bundle(tmp_path / f"{host}.yaml", document)
        assert install(path, system_layout(root), python=sys.executable) == 0
        config = load_config(root / "etc/greenfleet/agent.yaml", environ={})
        assert config.broker.tls is None and config.broker.allow_plaintext is allow


def test_cli_install_dry_run_install_refuse_and_uninstall(
    tmp_path: Path, bundle: Path, no_user: None, capsys: Any
) -> None:
    root = str(tmp_path / "root")
    assert main(["install", str(bundle), "--root", root, "--dry-run"]) == 0
    assert "nothing is written" in capsys.readouterr().out
    assert not Path(root).exists()
    assert main(["install", str(bundle), "--root", root]) == 0
    capsys.readouterr()
    assert main(["install", str(bundle), "--root", root]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["install", str(bundle), "--root", root, "--user", "--service-user", "x"]) == 1
    assert "--service-user does not apply to --user" in capsys.readouterr().err
    assert main(["install", str(tmp_path / "missing"), "--root", root]) == 1
    assert "cannot read bundle" in capsys.readouterr().err
    assert main(["install", str(bundle), "--root", root, "--state-dir", "rel"]) == 1
    assert "--state-dir must be an absolute path" in capsys.readouterr().err
    assert main(["uninstall", "--root", root, "--purge"]) == 0
    assert files_under(Path(root)) == []


def test_the_python_check_finds_an_interpreter_without_the_agent(tmp_path: Path) -> None:
    assert inst.check_python(sys.executable) is None
    bare = inst.check_python("/nonexistent/python3")
    assert bare is not None and "cannot run /nonexistent/python3" in bare
