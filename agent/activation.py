"""Which model is active on this device, kept on disk so a restart comes back to it.

Layout under the agent's state directory::

    models/<sha256>.<onnx|tflite>    verified artifacts, immutable once renamed into place
    models/<sha256>.manifest.json    the manifest each came with (its rules are the last tier)
    downloads/                       partial transfers (see agent.transfer)
    active.json                      {"active": ..., "last_good": ..., "fallback": ...,
                                     "preloaded": ...}, replaced by one rename
    deploy.json                      the deploy in progress and its state (fetching, verifying,
                                     staging); gone once it is active or rejected

Switching the active model writes the new pointer to a temp file, fsyncs it and renames it over
``active.json``: the device is always either on the old model or on the new one. The model that
was active before becomes ``last_good``. ``fallback`` is a small variant the controller staged in
advance for the fallback chain (agent.fallback); it is never made active by a deploy.
``preloaded`` is a model fetched and staged ahead of its activation (a ``slot=preload`` deploy,
for maintenance windows): kept on disk until an active deploy of the same file activates it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec
import msgspec.json

from agent import protocol as p
from agent.protocol import ActiveModel, Budgets, Deploy, Manifest, Strict
from agent.transfer import fsync_dir

log = logging.getLogger(__name__)


class Pointer(Strict, frozen=True, kw_only=True):
    """The content of active.json."""

    active: ActiveModel | None = None
    last_good: ActiveModel | None = None
    fallback: ActiveModel | None = None
    preloaded: ActiveModel | None = None
    budgets: Budgets | None = None  # what the controller sent with the active deploy


class Activation:
    """The on-disk record of the active and last-good models."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.models_dir = state_dir / "models"
        self.downloads_dir = state_dir / "downloads"
        self.pointer_path = state_dir / "active.json"

    def prepare(self) -> None:
        """Create the directories (the only I/O; kept out of the constructor)."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.downloads_dir.mkdir(parents=True, exist_ok=True)

    def artifact_path(self, model: ActiveModel) -> Path:
        return self.models_dir / f"{model.sha256}.{model.format.value}"

    def read(self) -> Pointer:
        """The current pointer; a missing or unreadable file means no model yet (logged)."""
        try:
            return p.load(Pointer, self.pointer_path.read_bytes())
        except FileNotFoundError:
            return Pointer()
        except (OSError, ValueError) as exc:
            log.error(
                "ignoring unreadable %s (%s); starting without a model", self.pointer_path, exc
            )
            return Pointer()

    def activate(self, model: ActiveModel, budgets: Budgets | None = None) -> Pointer:
        """Make ``model`` active; the previously active one becomes last-good.

        The fallback stays unless it is a variant of another model (a different name); the
        preloaded model stays unless it is the one being activated.
        """
        current = self.read()
        last_good = (
            current.active if current.active and current.active != model else current.last_good
        )
        fallback = current.fallback
        if fallback is not None and (
            fallback.model.name != model.model.name or fallback.sha256 == model.sha256
        ):
            fallback = None
        preloaded = current.preloaded
        if preloaded is not None and preloaded.sha256 == model.sha256:
            preloaded = None
        return self._write(
            Pointer(
                active=model,
                last_good=last_good,
                fallback=fallback,
                preloaded=preloaded,
                budgets=budgets,
            )
        )

    def set_fallback(self, model: ActiveModel | None) -> Pointer:
        """Keep ``model`` (staged, verified) as the fallback tier; the active one is unchanged."""
        current = self.read()
        return self._write(p.replace(current, fallback=model))

    def set_preloaded(self, model: ActiveModel | None) -> Pointer:
        """Keep ``model`` (staged, verified) on disk until it is activated; the one preloaded
        before it, if any, is pruned unless another slot holds it."""
        current = self.read()
        return self._write(p.replace(current, preloaded=model))

    def save_manifest(self, sha256: str, manifest: Manifest) -> None:
        """Keep the manifest a model came with (before its pointer is written)."""
        path = self.models_dir / f"{sha256}.manifest.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(p.encode(manifest))
        os.replace(tmp, path)

    def manifest(self, model: ActiveModel) -> Manifest | None:
        """The manifest kept for ``model``, or None (not enrolled, or unreadable: logged)."""
        path = self.models_dir / f"{model.sha256}.manifest.json"
        try:
            return p.load(Manifest, path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable manifest %s (%s)", path, exc)
            return None

    def _write(self, pointer: Pointer) -> Pointer:
        tmp = self.pointer_path.with_suffix(".json.tmp")
        with tmp.open("w") as fh:
            fh.write(msgspec.json.format(p.encode(pointer), indent=1).decode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.pointer_path)
        fsync_dir(self.state_dir)
        self._prune(pointer)
        return pointer

    # -- the deploy in progress ----------------------------------------------------------------

    @property
    def pending_path(self) -> Path:
        return self.state_dir / "deploy.json"

    def save_pending(self, command: Deploy, state: str) -> None:
        """Remember the deploy being worked on, so a restarted agent carries on with it."""
        tmp = self.pending_path.with_suffix(".json.tmp")
        tmp.write_bytes(msgspec.json.encode({"state": state, "command": p.to_builtins(command)}))
        os.replace(tmp, self.pending_path)

    def load_pending(self) -> tuple[Deploy, str] | None:
        """The deploy a previous run did not finish, or None (an unreadable record is dropped)."""
        try:
            raw = msgspec.json.decode(self.pending_path.read_bytes())
            return p.convert(raw["command"], Deploy), str(raw["state"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("dropping unreadable %s (%s)", self.pending_path, exc)
            self.clear_pending()
            return None

    def clear_pending(self) -> None:
        self.pending_path.unlink(missing_ok=True)

    def _prune(self, pointer: Pointer) -> None:
        """Delete model files no slot of the pointer holds (devices have small disks)."""
        slots = (pointer.active, pointer.last_good, pointer.fallback, pointer.preloaded)
        kept = [m for m in slots if m]
        keep = {self.artifact_path(m).name for m in kept}
        keep |= {f"{m.sha256}.manifest.json" for m in kept}
        pending = self.load_pending()
        if pending is not None:  # a finished download waiting to be staged is not garbage
            deploy = pending[0]
            keep.add(f"{deploy.artifact.sha256}.{deploy.artifact.format.value}")
            keep.add(f"{deploy.artifact.sha256}.manifest.json")
        for path in self.models_dir.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)
