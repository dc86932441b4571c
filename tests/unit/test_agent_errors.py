"""The agent's error tree (agent/errors.py) is the one its code raises: every exception class
the agent defines is in it, or named as deliberately outside it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import agent
from agent.errors import AgentError

OUTSIDE = {"ProtocolError", "NoSpaceError", "HandshakeCut"}


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(agent.__path__, "agent."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == info.name
                and not name.startswith("_")  # private: caught in its own module
            ):
                found[name] = value
    return found


def test_every_agent_exception_is_in_the_documented_tree() -> None:
    classes = _exception_classes()
    assert {"ModelLoadError", "ManifestRejected", "MeterError"} <= set(classes)
    tree = importlib.import_module("agent.errors").__doc__ or ""
    for name, cls in classes.items():
        assert name in tree, f"{name} is missing from agent/errors.py's docstring"
        if name not in OUTSIDE:
            assert issubclass(cls, AgentError), f"{name} is not an AgentError"
