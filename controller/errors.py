"""The controller's error tree; the CLI turns any of these into a one-line message and exit 1.

ControllerError
├── NotFound          a device or model that the command names does not exist
├── InvalidRequest    the operator asked for something malformed or impossible
└── DatabaseError     the database cannot be opened or migrated (sqlite3 errors, translated)
"""


class ControllerError(Exception):
    """Base of everything the controller raises on purpose."""


class NotFound(ControllerError):
    """A named device or model does not exist; the message says how to list what does."""


class InvalidRequest(ControllerError):
    """A malformed or impossible request."""


class DatabaseError(ControllerError):
    """The controller database cannot be used."""
