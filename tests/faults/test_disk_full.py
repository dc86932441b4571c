"""The disk fills up while the agent receives a model.

The agent's ``downloads`` and ``models`` directories live on a small disk (2 MiB) that already
holds the active model; another program fills the disk in the middle of a transfer. A user must
see: the deploy fails cleanly with a reply and a ``deploy_failed`` event that say the disk is full
and what to do; inference goes on with the active model (telemetry keeps reporting inferences);
the partial download is deleted so its space comes back; a deploy that cannot fit is refused
before any byte is fetched; and once space is freed the same deploy goes through.

How the small disk is made depends on what the host allows; the test id says which was used:

- ``tmpfs``: a tmpfs mounted by the test (needs root with CAP_SYS_ADMIN);
- ``tmpfs-in-namespace``: the agent runs under ``unshare --user --map-root-user --mount`` with
  the tmpfs mounted in its own mount namespace (needs user namespaces); the test reaches the disk
  through ``/proc/<pid>/root``;
- ``simulated-enospc``: neither works (a locked-down container): the agent runs under a small
  wrapper that makes ``os.pwrite`` fail with ENOSPC and ``os.statvfs`` report a 2 MiB disk
  for files under the directory. The same scenario and assertions, at the write seam the agent
  uses, rather than a skip. ``GREENFLEET_TEST_SMALL_DISK`` forces one of the three.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from agent import protocol as p
from agent.activation import Activation
from controller.broker import Mosquitto
from tests.conftest import Probe, Processes, agent_config, unique
from tests.e2e.fake_controller import MODEL, FakeController

pytestmark = pytest.mark.e2e

SIZE = 2 * 1024 * 1024  # active model (0.7 MB) + one more, but not with a filler beside them
ACTIVE = p.ModelRef(name="vibration-ae", version="1.0.0")
EXECVP = "import os, sys; os.execvp(sys.argv[1], sys.argv[1:])"

SIMULATOR = '''
"""greenfleet-agent on a simulated small disk: the fallback of tests/faults/test_disk_full.py.

Writes through os.pwrite (the agent's download writes) to files under ROOT fail with ENOSPC
once the files under ROOT would take more than LIMIT bytes, and os.statvfs reports ROOT as a
LIMIT-byte disk. Usage: simulate_small_disk.py ROOT LIMIT <greenfleet-agent arguments>.
"""
import errno, os, sys

root, limit = os.path.realpath(sys.argv[1]), int(sys.argv[2])
real_pwrite, real_statvfs = os.pwrite, os.statvfs


def inside(path):
    return path == root or path.startswith(root + os.sep)


def used():
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                pass
    return total


def pwrite(fd, data, offset):
    if inside(os.readlink(f"/proc/self/fd/{fd}")) and used() + len(data) > limit:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_pwrite(fd, data, offset)


def statvfs(path):
    if inside(os.path.realpath(path)):
        free = max(limit - used(), 0)  # 1-byte fragments: blocks and free counts are bytes
        return os.statvfs_result((4096, 1, limit, free, free, 1000, 1000, 1000, 0, 255))
    return real_statvfs(path)


os.pwrite, os.statvfs = pwrite, statvfs
sys.argv = ["greenfleet-agent", *sys.argv[3:]]
from agent.cli import main

sys.exit(main())
'''


def _mount(path: Path, size: int) -> bool:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        timeout=10,
    )
    return done.returncode == 0


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=10).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def small_disk_mechanism() -> str:
    """The most real small disk this host allows (tried once, at collection)."""
    forced = os.environ.get("GREENFLEET_TEST_SMALL_DISK")
    if forced:
        return forced
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if _mount(Path(tmp), 64 * 1024):
                _umount(Path(tmp))
                return "tmpfs"
        except (OSError, subprocess.SubprocessError):
            pass
        if shutil.which("unshare"):
            try:
                probe = subprocess.run(
                    ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                     f"mount -t tmpfs -o size=64k tmpfs {tmp}"],
                    capture_output=True,
                    timeout=10,
                )  # fmt: skip
                if probe.returncode == 0:
                    return "tmpfs-in-namespace"
            except (OSError, subprocess.SubprocessError):
                pass
    return "simulated-enospc"


def allocated(root: Path) -> int:
    return sum(f.lstat().st_blocks * 512 for f in root.rglob("*") if f.is_file())


class SmallDisk:
    """The agent's small disk at ``root``, made the way ``how`` says; :attr:`view` is where the
    test reaches it (inside the agent's mount namespace for ``tmpfs-in-namespace``)."""

    def __init__(self, how: str, root: Path, seed: Path) -> None:
        self.how, self.root, self.seed = how, root, seed
        self.view = root
        self.mounted = False
        root.mkdir(parents=True)

    def prepare(self) -> None:
        if self.how == "tmpfs":
            assert _mount(self.root, SIZE), "mount worked at collection but not now"
            self.mounted = True
        for sub in ("models", "downloads"):
            (self.root / sub).mkdir()
        if self.how != "tmpfs-in-namespace":  # there the agent's own shell copies the seed
            for model in (self.seed / "models").iterdir():
                shutil.copyfile(model, self.root / "models" / model.name)

    def start_agent(self, processes: Processes, name: str, config: Path) -> None:
        run = ["-m", "agent.cli", "run", "--config", str(config)]
        if self.how == "simulated-enospc":
            wrapper = config.parent / "simulate_small_disk.py"
            wrapper.write_text(SIMULATOR)
            proc = processes.start(name, str(wrapper), str(self.root), str(SIZE), *run[2:])
        elif self.how == "tmpfs-in-namespace":
            script = (
                f"mount -t tmpfs -o size={SIZE} tmpfs {self.root} && "
                f"mkdir {self.root}/models {self.root}/downloads && "
                f"cp {self.seed}/models/* {self.root}/models/ && "
                f"exec {sys.executable} {' '.join(run)}"
            )
            proc = processes.start(
                name, "-c", EXECVP, "unshare", "--user", "--map-root-user", "--mount",
                "sh", "-c", script,
            )  # fmt: skip
            # one process all along (exec, exec, exec): its root shows its mounts
            self.view = Path(f"/proc/{proc.pid}/root{self.root}")
        else:
            proc = processes.start(name, *run)
        deadline = time.monotonic() + 20
        while not self._ready():
            assert proc.poll() is None, processes.log(name)
            assert time.monotonic() < deadline, f"no small disk yet\n{processes.log(name)}"
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            return self.total() == SIZE and any((self.view / "models").iterdir())
        except OSError:
            return False

    def total(self) -> int:
        if self.how == "simulated-enospc":
            return SIZE
        return shutil.disk_usage(self.view).total

    def free(self) -> int:
        if self.how == "simulated-enospc":
            return SIZE - allocated(self.root)
        return shutil.disk_usage(self.view).free

    def fill(self) -> int:
        """Another program takes every free byte; return what its file occupies."""
        filler = self.view / "other-program.dat"
        if self.how == "simulated-enospc":
            filler.write_bytes(b"\0" * max(self.free(), 0))
        else:
            block = b"\0" * 65536
            with filler.open("wb", buffering=0) as fh:
                try:
                    while True:
                        fh.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                for size in (4096, 512, 1):  # the last pages
                    try:
                        while True:
                            fh.write(block[:size])
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
        return filler.lstat().st_blocks * 512

    def unfill(self) -> None:
        (self.view / "other-program.dat").unlink()

    def downloads(self) -> list[str]:
        return sorted(f.name for f in (self.view / "downloads").iterdir())

    def close(self) -> None:
        if self.mounted:
            _umount(self.root)
            self.mounted = False


def variant(tag: str) -> bytes:
    """The sample model with another doc string: same graph, another sha256."""
    graph = onnx.load_from_string(MODEL)
    graph.doc_string = tag
    return graph.SerializeToString()


def install_active_model(state: Path, seed: Path, disk: SmallDisk) -> None:
    """The device runs vibration-ae:1.0.0 from its small disk, as a previous deploy left it."""
    sha = hashlib.sha256(MODEL).hexdigest()
    (seed / "models").mkdir(parents=True)
    (seed / "models" / f"{sha}.onnx").write_bytes(MODEL)
    disk.prepare()
    state.mkdir()
    for sub in ("models", "downloads"):
        (state / sub).symlink_to(disk.root / sub)
    active = p.ActiveModel(model=ACTIVE, sha256=sha, format=p.ModelFormat.ONNX)
    if disk.how == "tmpfs-in-namespace":  # the file is copied in when the agent starts
        (disk.root / "models" / f"{sha}.onnx").write_bytes(MODEL)
    Activation(state).activate(active)


def wait(predicate: Callable[[], object], timeout: float, what: str, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log}")
        time.sleep(0.05)


def inferring(probe: Probe, device: str, since: int) -> None:
    """A telemetry window after ``since`` reports inferences by the active model."""

    def match(topic: str, payload: bytes) -> bool:
        if topic != p.topic(device, p.Channel.TELEMETRY):
            return False
        batch = p.decode(payload)
        return isinstance(batch, p.TelemetryBatch) and any(
            r.inferences > 0 and r.model == ACTIVE for r in batch.records
        )

    probe.wait_for(match, 10, "telemetry with inferences by the active model", since=since)


@pytest.mark.parametrize("how", [small_disk_mechanism()])
def test_a_full_disk_fails_the_deploy_cleanly_and_a_retry_after_freeing_space_works(
    how: str,
    mosquitto: Mosquitto,
    processes: Processes,
    probe_factory: Callable[..., Probe],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    record_property("small_disk", how)
    print(f"small disk made with: {how}")
    device = unique("full")
    state = tmp_path / f"{device}-state"
    disk = SmallDisk(how, tmp_path / "small-disk", tmp_path / "seed")
    probe = probe_factory(f"gf/v1/{device}/#")
    try:
        install_active_model(state, tmp_path / "seed", disk)
        config = agent_config(tmp_path / f"{device}.yaml", device, mosquitto.port, interval_s=0.5)
        disk.start_agent(processes, device, config)
        log = lambda: f"[{how}]\n{processes.log(device)[-3000:]}"  # noqa: E731
        probe.wait_for(lambda t, m: t.endswith("/state") and b'"birth"' in m, 30, "birth")
        ctl = FakeController(probe, device)
        ctl.serving(str(ACTIVE))
        free_before = disk.free()
        assert free_before > len(MODEL), f"[{how}] the new model would fit at first"

        # 1. the disk fills up in the middle of the transfer
        ctl.chunk_delay_s = 0.25
        data = variant("disk full test")
        ref = ctl.deploy(data, "1.1.0")
        wait(lambda: ctl.chunks_served >= 3, 20, "the transfer under way", log())
        filler = disk.fill()
        reply = ctl.reply_to(ref, timeout=20)
        since = probe.mark()
        assert not reply.ok, f"[{how}] {reply}"
        error = reply.error or ""
        expected = ("is full", "Free space on that disk", "deploy again", f"still running {ACTIVE}")
        for needle in expected:
            assert needle in error, f"[{how}] {needle!r} not in the reply: {error}"
        failed = ctl.event(p.EventKind.DEPLOY_FAILED, 0, "is full")
        assert failed.detail.get("model") == "vibration-ae:1.1.0"
        ctl.chunk_delay_s = 0.0

        # the partial file is gone and its space came back; inference never stopped
        wait(lambda: disk.downloads() == [], 5, "the partial download to be deleted", log())
        assert abs(disk.free() - (free_before - filler)) <= 8192, (
            f"[{how}] free {disk.free()}, expected {free_before - filler}: space not released"
        )
        inferring(probe, device, since)
        ctl.serving(str(ACTIVE))
        assert Activation(state).read().active.model == ACTIVE  # type: ignore[union-attr]

        # 2. while the disk is full, a deploy is refused before anything is fetched
        since = probe.mark()
        reply = ctl.reply_to(ctl.deploy(data, "1.1.0"), timeout=10)
        assert not reply.ok and "is full" in (reply.error or ""), f"[{how}] {reply}"
        assert f"needs {len(data):,} more bytes" in (reply.error or ""), reply.error
        assert not [
            t for t, _ in probe.history[since:] if t == p.topic(device, p.Channel.BLOB_REQ)
        ], "no chunk was asked for"
        assert disk.downloads() == []

        # 3. space freed: the same deploy goes through
        disk.unfill()
        reply = ctl.reply_to(ctl.deploy(data, "1.1.0"), timeout=20)
        assert reply.ok, f"[{how}] {reply.error}\n{log()}"
        ctl.serving("vibration-ae:1.1.0")
        assert disk.downloads() == []
        ctl.close()
    finally:
        processes.stop_all()
        disk.close()
