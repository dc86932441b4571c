"""The agent's version, reported in its birth message."""

__version__ = "0.1.0"
