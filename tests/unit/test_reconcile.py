"""Reconcile decisions, table-driven, with an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controller.reconcile import DeployDecision, DeviceView, LastDeploy, plan_deploys

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
FORMATS = {"m:1": "onnx", "m:2": "onnx", "t:1": "tflite"}


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
