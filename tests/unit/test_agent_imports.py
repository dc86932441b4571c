"""What an agent loads to run: the modules it never uses at run time stay out of its memory
(issue 14's agent memory budget), and stay usable by whoever does need them."""

from __future__ import annotations

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
