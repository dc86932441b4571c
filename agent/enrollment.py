"""The enrollment bundle: everything a new device needs to join the fleet, in one file.

``greenfleet devices add`` (controller) writes it; ``greenfleet-agent install BUNDLE`` (on the
device) turns it into the agent's config, its TLS files and a service. It holds secrets (the
broker password or the client key): it is written with mode 0600 and should be moved to the
device over a trusted channel and deleted afterwards.

Format: YAML, ``kind: greenfleet-enrollment``, ``version: 1``; see :class:`Bundle`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct, field

from agent.protocol import DeviceId


class BundleBroker(Struct, forbid_unknown_fields=True, kw_only=True):
    """The broker and the login: a password, or a client certificate and key (PEM), and the
    CA of the broker's certificate for TLS."""

    host: str
    port: Annotated[int, Meta(ge=1, le=65535)]
    username: str | None = None
    password: str | None = None
    ca_pem: str | None = None
    cert_pem: str | None = None
    key_pem: str | None = None
    allow_plaintext: bool = False


class Bundle(Struct, forbid_unknown_fields=True, kw_only=True):
    """One device's identity and where its controller is: the controller's Ed25519 signing
    key(s) in hex, and ``power`` (idle_w / active_w_per_core) from the class profile."""

    kind: Literal["greenfleet-enrollment"] = "greenfleet-enrollment"
    version: Literal[1] = 1
    device_id: DeviceId
    device_class: str
    labels: dict[str, str] = field(default_factory=dict)
    broker: BundleBroker
    controller_keys: Annotated[list[str], Meta(min_length=1)]
    power: dict[str, float] = field(default_factory=dict)
