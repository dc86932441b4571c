"""The controller's home directory: database, model store and keys, in one place.

``$GREENFLEET_HOME`` chooses it (default ``./.greenfleet``); every command honours it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = Path(".greenfleet")


@dataclass(frozen=True, slots=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls, override: str | Path | None = None) -> Home:
        root = Path(override or os.environ.get("GREENFLEET_HOME") or DEFAULT_HOME)
        return cls(root.expanduser().resolve())

    @property
    def database(self) -> Path:
        return self.root / "greenfleet.db"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def config(self) -> Path:
        return self.root / "controller.yaml"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def pki(self) -> Path:
        """The fleet CA (ca.key 0600, ca.pem), the broker's server key, controller.yaml."""
        return self.root / "pki"

    @property
    def controller_credentials(self) -> Path:
        """How the controller logs in to the secured broker (0600; controller.identity)."""
        return self.pki / "controller.yaml"

    @property
    def broker_dir(self) -> Path:
        """Default output of ``greenfleet broker config``: mosquitto.conf, passwd, acl, ..."""
        return self.root / "broker"

    @property
    def enrollments(self) -> Path:
        """Default place of enrollment bundles written by ``greenfleet devices add`` (0700)."""
        return self.root / "enroll"

    @property
    def scratch(self) -> Path:
        """Work space for long jobs (variant builds); on the same disk as the store."""
        return self.root / "tmp"

    def prepare(self) -> Home:
        self.store.mkdir(parents=True, exist_ok=True)
        return self
