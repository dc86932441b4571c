"""The enrollment bundle: everything a new device needs to join the fleet, in one file.

``greenfleet devices add`` (controller) writes it; ``greenfleet-agent install BUNDLE`` (on the
device) turns it into the agent's config, its TLS files and a service. It holds secrets (the
broker password or the client key): it is written with mode 0600 and should be moved to the
device over a trusted channel and deleted afterwards.

Format: YAML, ``kind: greenfleet-enrollment``, ``version: 1``; see :class:`Bundle`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.protocol import DeviceId


class BundleBroker(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str
    port: int = Field(ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(default=None, description="For password auth.")
    ca_pem: str | None = Field(default=None, description="CA of the broker certificate (TLS).")
    cert_pem: str | None = Field(default=None, description="Client certificate (cert auth).")
    key_pem: str | None = Field(default=None, description="Client private key (cert auth).")
    allow_plaintext: bool = False


class Bundle(BaseModel):
    """One device's identity and where its controller is."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["greenfleet-enrollment"] = "greenfleet-enrollment"
    version: Literal[1] = 1
    device_id: DeviceId
    device_class: str
    labels: dict[str, str] = Field(default_factory=dict)
    broker: BundleBroker
    controller_keys: list[str] = Field(
        min_length=1, description="The controller's Ed25519 signing key(s), hex."
    )
    power: dict[str, float] = Field(
        default_factory=dict, description="idle_w / active_w_per_core from the class profile."
    )
