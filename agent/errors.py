"""The agent's error tree. Third-party errors are translated into these at the boundary.

AgentError
├── ConfigError          bad or unreadable config file (fatal at start)
├── BrokerAuthError      the broker refused our credentials (fatal, never retried)
├── TransferError        a chunk or artifact that does not match what was announced
│   └── IntegrityError   the assembled file's sha256 or size is wrong
├── ManifestRejected     agent.verify: a deploy's manifest, signature or golden cases fail
├── InstallError         agent.install: an enrollment bundle cannot be installed
├── MeterUnavailable     agent.power.base: a power meter cannot be read on this host
├── MeterError           agent.power.base: a reading failed mid-run
│   └── WindowSkipped    no reading for this telemetry window
└── ModelRuntimeError    agent.runtime.base
    ├── ModelLoadError   a model file cannot be loaded
    └── InferenceError   one inference call failed

Outside the tree on purpose: agent.protocol.ProtocolError (a ValueError: bad bytes on the
wire, shared with the controller), agent.transfer.NoSpaceError (an OSError: the disk) and
agent.link.HandshakeCut (an ssl.SSLError the TLS layer raises for a cut handshake).
A test checks that every exception class the agent defines is in this picture.
"""


class AgentError(Exception):
    """Base of everything the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration cannot be used; the message names the file, the key and the fix."""


class BrokerAuthError(AgentError):
    """The broker rejected the credentials; retrying would not help."""


class TransferError(AgentError):
    """A model transfer went wrong in a way the controller should hear about."""


class IntegrityError(TransferError):
    """The downloaded bytes are not the announced artifact."""
