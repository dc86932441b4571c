"""What an agent loads to run: the modules it never uses at run time stay out of its memory
(issue 14's agent memory budget), and stay usable by whoever does need them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.power import pmic


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_agent_does_not_load_what_it_never_uses() -> None:
    """urllib.request (paho's proxy lookup, with http.client and the email package), shutil
    (argparse's terminal width, the download's free space), subprocess (the PMIC meter on a
    host without vcgencmd), dataclasses (msgspec's structs instead) and json (msgspec's) stay
    out of an agent that has built its parser and services."""
    loaded = _run(
        """
        import sys
        from agent.cli import build_parser
        from agent.power.chain import MeterChain
        from agent.power.base import MeterUnavailable
        from agent.power.pmic import PmicMeter
        import agent.service
        build_parser().parse_args(["run", "--config", "agent.yaml"])
        try:
            PmicMeter(command="no-such-vcgencmd").start()
        except MeterUnavailable as exc:
            assert "not found" in str(exc), exc
        unused = ("http.client", "email", "shutil", "subprocess", "dataclasses", "json")
        print(" ".join(m for m in unused if m in sys.modules))
        """
    )
    assert loaded == ""


def test_urllib_request_still_works_for_whoever_reads_it() -> None:
    out = _run(
        """
        import sys
        import agent.link
        import urllib.request
        from urllib.request import Request
        print(Request("http://example.invalid/x").host, type(urllib.request.getproxies()).__name__,
              sys.modules["urllib.request"].urlopen is urllib.request.urlopen,
              "http.client" in sys.modules)
        """
    )
    assert out == "example.invalid dict True True"


def test_a_command_is_found_on_path_without_starting_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = tmp_path / "vcgencmd"
    tool.write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not pmic.on_path("vcgencmd"), "not executable"
    tool.chmod(0o755)
    assert pmic.on_path("vcgencmd")
    assert pmic.on_path(str(tool))
    assert not pmic.on_path("absent-tool")
    assert not pmic.on_path(str(tmp_path / "absent-tool"))


def test_the_deferred_module_is_the_one_module_everyone_patches() -> None:
    """Found in review: a stand-in object beside the real module let ``mock.patch`` and
    ``install_opener`` act on the copy nobody calls. The module now loads in place."""
    out = _run(
        """
        import sys
        from unittest import mock
        import agent.link
        import urllib.request
        stand_in = sys.modules["urllib.request"]
        with mock.patch("urllib.request.urlopen", lambda *a, **k: "patched"):
            from urllib.request import urlopen
            patched = urlopen("http://example.invalid/")
        opener = urllib.request.build_opener()
        urllib.request.install_opener(opener)
        import importlib
        importlib.reload(urllib.request)
        print(patched, stand_in is sys.modules["urllib.request"] is urllib.request,
              type(stand_in).__name__)
        """
    )
    assert out == "patched True module"


def test_the_help_is_as_wide_as_the_terminal_says(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.cli import _columns

    monkeypatch.setenv("COLUMNS", "132")
    assert _columns() == 132
    monkeypatch.setenv("COLUMNS", "not a number")
    assert _columns() >= 80 or _columns() > 0
    monkeypatch.delenv("COLUMNS")
    monkeypatch.setattr("os.get_terminal_size", lambda fd: os.terminal_size((200, 50)))
    assert _columns() == 200
