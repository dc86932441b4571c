"""Reconcile decisions, table-driven, with an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.config import load_controller_config
from controller.errors import InvalidRequest
from controller.reconcile import (
    DeployDecision,
    DeviceView,
    LastDeploy,
    limit_transfers,
    plan_deploys,
    plan_fallback_deploys,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
DISK = "cannot store the download: the disk holding /x is full: the model needs 1 more bytes"
FORMATS = {"m:1": "onnx", "m:2": "onnx", "t:1": "tflite", "m:2+small": "onnx", "m:2+tfl": "tflite"}


def dev(
    active: str | None = "m:1",
    desired: str | None = "m:2",
    online: bool = True,
    runtimes: frozenset[str] = frozenset({"onnx"}),
) -> DeviceView:
    return DeviceView("d", online, active, desired, runtimes)


@pytest.mark.parametrize(
    "device, last, expect_deploy, skip_reason",
    [
        (dev(), None, True, None),
        (dev(desired="m:1"), None, False, None),
        (dev(desired=None), None, False, None),
        (dev(online=False), None, False, "offline"),
        (dev(desired="x:9"), None, False, "not in the catalog"),
        (dev(desired="t:1"), None, False, "no tflite runtime"),
        (dev(), LastDeploy("m:2", NOW - timedelta(seconds=10), "sent"), False, "waiting"),
        (dev(), LastDeploy("m:2", NOW - timedelta(seconds=31), "sent"), True, None),
        (dev(), LastDeploy("m:2", NOW - timedelta(minutes=2), "failed"), False, "failed"),
        (dev(), LastDeploy("m:2", NOW - timedelta(minutes=6), "failed"), True, None),
        (dev(), LastDeploy("m:1", NOW - timedelta(seconds=1), "ok"), True, None),
        # a passing cause (a full disk, a stall) is tried again sooner, with backoff
        (dev(), LastDeploy("m:2", NOW - timedelta(seconds=29), "failed", DISK, 1), False, "failed"),
        (dev(), LastDeploy("m:2", NOW - timedelta(seconds=31), "failed", DISK, 1), True, None),
        (dev(), LastDeploy("m:2", NOW - timedelta(seconds=59), "failed", DISK, 2), False, "failed"),
        (dev(), LastDeploy("m:2", NOW - timedelta(seconds=61), "failed", DISK, 2), True, None),
        (dev(), LastDeploy("m:2", NOW - timedelta(minutes=4), "failed", DISK, 5), False, "failed"),
        (dev(), LastDeploy("m:2", NOW - timedelta(minutes=6), "failed", DISK, 9), True, None),
        # any other cause waits the full delay; an operator's --retry goes now
        (
            dev(),
            LastDeploy("m:2", NOW - timedelta(seconds=31), "failed", "bad signature"),
            False,
            "failed",
        ),
        (dev(), LastDeploy("m:2", NOW - timedelta(seconds=1), "retry", DISK, 3), True, None),
    ],
)
def test_plan_deploys(
    device: DeviceView, last: LastDeploy | None, expect_deploy: bool, skip_reason: str | None
) -> None:
    deploys, skips = plan_deploys([device], FORMATS, {"d": last} if last else {}, NOW)
    assert deploys == ([DeployDecision("d", device.desired_model or "")] if expect_deploy else [])
    if skip_reason:
        assert len(skips) == 1 and skip_reason in skips[0].reason
    else:
        assert skips == []


def ready(
    active: str | None = "m:2",
    desired: str | None = "m:2",
    fallback: str | None = None,
    wanted: str | None = "m:2+small",
    online: bool = True,
) -> DeviceView:
    """A device that runs (or not) its desired model, with a fallback chosen for it."""
    return DeviceView("d", online, active, desired, frozenset({"onnx"}), fallback, wanted)


def sent(model: str, ago_s: float, status: str = "sent") -> LastDeploy:
    return LastDeploy(model, NOW - timedelta(seconds=ago_s), status)


@pytest.mark.parametrize(
    "device, last_active, last_fallback, expect_deploy, skip_reason",
    [
        pytest.param(ready(), None, None, True, None, id="stage"),
        pytest.param(ready(), sent("m:2", 600, "ok"), None, True, None, id="after-active-ok"),
        pytest.param(ready(fallback="m:2+small"), None, None, False, None, id="already-staged"),
        pytest.param(ready(fallback="m:1+small"), None, None, True, None, id="stale-fallback"),
        pytest.param(ready(wanted=None), None, None, False, None, id="no-fallback-chosen"),
        pytest.param(ready(online=False), None, None, False, "offline", id="offline"),
        pytest.param(ready(active="m:1"), None, None, False, "waits until m:2", id="not-active"),
        pytest.param(ready(active=None), None, None, False, "waits until", id="nothing-active"),
        pytest.param(ready(desired=None), None, None, False, "waits until", id="no-intent"),
        pytest.param(ready(), sent("m:3", 5), None, False, "in flight", id="active-in-flight"),
        pytest.param(ready(), sent("m:3", 31), None, True, None, id="active-reply-lost"),
        pytest.param(ready(), sent("m:2", 5), None, True, None, id="active-done-reply-due"),
        pytest.param(ready(), sent("m:2", 5, "failed"), None, True, None, id="active-failed"),
        pytest.param(ready(wanted="x:9"), None, None, False, "not in the catalog", id="unknown"),
        pytest.param(ready(wanted="m:2+tfl"), None, None, False, "no tflite", id="no-runtime"),
        pytest.param(
            ready(), None, sent("m:2+small", 10), False, "fallback deploy", id="wait-resend"
        ),
        pytest.param(ready(), None, sent("m:2+small", 31), True, None, id="resend"),
        pytest.param(
            ready(), None, sent("m:2+small", 60, "ok"), True, None, id="ok-but-not-reported"
        ),
        pytest.param(
            ready(), None, sent("m:2+small", 120, "failed"), False, "failed", id="failed-backoff"
        ),
        pytest.param(ready(), None, sent("m:2+small", 360, "failed"), True, None, id="retry"),
        pytest.param(ready(), None, sent("m:1+small", 1), True, None, id="new-choice"),
    ],
)
def test_plan_fallback_deploys(
    device: DeviceView,
    last_active: LastDeploy | None,
    last_fallback: LastDeploy | None,
    expect_deploy: bool,
    skip_reason: str | None,
) -> None:
    deploys, skips = plan_fallback_deploys(
        [device],
        FORMATS,
        {"d": last_active} if last_active else {},
        {"d": last_fallback} if last_fallback else {},
        NOW,
    )
    wanted = device.desired_fallback or ""
    assert deploys == ([DeployDecision("d", wanted, "fallback")] if expect_deploy else [])
    if skip_reason:
        assert len(skips) == 1 and skip_reason in skips[0].reason
    else:
        assert skips == []


def test_active_and_fallback_deploys_never_go_out_together() -> None:
    """Whatever the state, a device gets at most one of the two in a pass: the fallback only
    once the active model is the desired one, and the active deploy only before."""
    devices = [
        ready(active=a, desired=d, fallback=f)
        for a in ("m:1", "m:2", None)
        for d in ("m:1", "m:2", None)
        for f in ("m:2+small", None)
    ]
    for device in devices:
        active, _ = plan_deploys([device], FORMATS, {}, NOW)
        staged, _ = plan_fallback_deploys([device], FORMATS, {}, {}, NOW)
        assert not (active and staged), device


def test_at_most_the_limit_of_devices_fetch_at_once_and_resends_take_no_new_slot() -> None:
    decisions = [DeployDecision(f"d{i}", "m:1.0.0") for i in range(6)]
    sending, waiting = limit_transfers(decisions, busy={"d1", "x"}, limit=4)
    # two slots are taken (d1, x); d1's resend goes out anyway, d0 and d2 take the free two
    assert [d.device for d in sending] == ["d0", "d1", "d2"]
    assert [s.device for s in waiting] == ["d3", "d4", "d5"]
    assert "max_concurrent_transfers" in waiting[0].reason


def test_a_full_set_of_transfers_sends_only_resends() -> None:
    decisions = [DeployDecision("a", "m:1.0.0"), DeployDecision("b", "m:1.0.0")]
    sending, waiting = limit_transfers(decisions, busy={"b", "c"}, limit=2)
    assert [d.device for d in sending] == ["b"] and [s.device for s in waiting] == ["a"]


def test_the_transfer_limit_comes_from_controller_yaml_and_must_be_positive(tmp_path: Path) -> None:
    path = tmp_path / "controller.yaml"
    assert load_controller_config(path).max_concurrent_transfers == 500  # the default
    path.write_text("max_concurrent_transfers: 50\n")
    assert load_controller_config(path).max_concurrent_transfers == 50
    path.write_text("max_concurrent_transfers: 0\n")
    with pytest.raises(InvalidRequest, match="max_concurrent_transfers"):
        load_controller_config(path)
