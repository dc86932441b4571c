"""The agent's error tree. Third-party errors are translated into these at the boundary.

AgentError
├── ConfigError          bad or unreadable config file (fatal at start)
├── BrokerAuthError      the broker refused our credentials (fatal, never retried)
├── TransferError        a chunk or artifact that does not match what was announced
│   └── IntegrityError   the assembled file's sha256 or size is wrong
└── runtime errors       agent.runtime.base: ModelLoadError, InferenceError
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
