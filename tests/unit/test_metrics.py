"""``/metrics``: scraped over the API and parsed with the Prometheus client's own parser."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from controller.api import create_app
from tests.unit.api_fleet import FP32, INT8, Fleet, build_fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return build_fleet(tmp_path_factory.mktemp("metrics") / "home")


@pytest.fixture(scope="module")
def scraped(fleet: Fleet) -> dict[str, tuple[str, list[Sample]]]:
    """family name -> (type, samples) of one scrape."""
    client = TestClient(
        create_app(fleet.home, dashboard=None),
        base_url="http://127.0.0.1:8080",
        client=("127.0.0.1", 40000),
    )
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(response.text)}


def values(
    scraped: dict[str, tuple[str, list[Sample]]], family: str, sample: str | None = None
) -> dict[tuple[tuple[str, str], ...], float]:
    """``{sorted label pairs: value}`` of one family's samples named ``sample``."""
    _, samples = scraped[family]
    return {
        tuple(sorted(s.labels.items())): s.value for s in samples if s.name == (sample or family)
    }


def test_families_and_types(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    expected = {
        "greenfleet_device_up": "gauge",
        "greenfleet_device_last_seen_timestamp_seconds": "gauge",
        "greenfleet_device_tier": "gauge",
        "greenfleet_inference_latency_seconds": "summary",
        "greenfleet_inferences": "counter",
        "greenfleet_inference_errors": "counter",
        "greenfleet_energy_joules": "counter",
        "greenfleet_power_watts": "gauge",
        "greenfleet_rollout_state": "gauge",
        "greenfleet_rollout_devices": "gauge",
    }
    assert {name: scraped[name][0] for name in expected} == expected
    _, counters = scraped["greenfleet_inferences"]
    assert {s.name for s in counters} == {"greenfleet_inferences_total"}
    assert "python_info" in scraped  # and the serving process's own standard metrics


def test_device_up(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    assert values(scraped, "greenfleet_device_up") == {
        (("device", "gw-1"), ("device_class", "x86-ipc"), ("line", "1"), ("site", "a")): 1.0,
        (("device", "gw-2"), ("device_class", "rpi4"), ("line", "2"), ("site", "b")): 0.0,
    }
    seen = values(scraped, "greenfleet_device_last_seen_timestamp_seconds")
    assert all(v > 1.7e9 for v in seen.values()) and len(seen) == 2


def test_counters_are_sums_over_telemetry(
    scraped: dict[str, tuple[str, list[Sample]]], fleet: Fleet
) -> None:
    inferences = values(scraped, "greenfleet_inferences", "greenfleet_inferences_total")
    gw1 = fleet.of("gw-1")
    assert inferences == {
        (("device", "gw-1"), ("model", INT8), ("tier", "active")): sum(
            w.inferences for w in gw1 if w.tier == "active"
        ),
        (("device", "gw-1"), ("model", INT8), ("tier", "fallback")): sum(
            w.inferences for w in gw1 if w.tier == "fallback"
        ),
        (("device", "gw-2"), ("model", FP32), ("tier", "active")): sum(
            w.inferences for w in fleet.of("gw-2")
        ),
    }
    errors = values(scraped, "greenfleet_inference_errors", "greenfleet_inference_errors_total")
    assert errors == {
        (("device", d),): float(sum(w.errors for w in fleet.of(d))) for d in ("gw-1", "gw-2")
    }
    energy = values(scraped, "greenfleet_energy_joules", "greenfleet_energy_joules_total")
    assert energy == {
        (("device", "gw-1"), ("method", "estimate")): pytest.approx(
            sum(w.energy_j * w.inferences for w in gw1)
        ),
        (("device", "gw-2"), ("method", "rapl")): pytest.approx(
            sum(w.energy_j * w.inferences for w in fleet.of("gw-2"))
        ),
    }


def test_latency_summary_and_power(
    scraped: dict[str, tuple[str, list[Sample]]], fleet: Fleet
) -> None:
    name = "greenfleet_inference_latency_seconds"
    newest = fleet.of("gw-1")[-1]
    quantiles = {
        dict(labels)["quantile"]: v
        for labels, v in values(scraped, name).items()
        if dict(labels)["device"] == "gw-1"
    }
    assert quantiles == pytest.approx(
        {"0.5": newest.p50 / 1000, "0.95": newest.p95 / 1000, "0.99": newest.p99 / 1000}
    )
    windows = fleet.of("gw-1")
    count = values(scraped, name, f"{name}_count")[(("device", "gw-1"),)]
    total = values(scraped, name, f"{name}_sum")[(("device", "gw-1"),)]
    assert count == sum(w.inferences for w in windows)
    assert total == pytest.approx(sum(w.p50 / 1000 * w.inferences for w in windows))
    assert not math.isnan(total) and total / count < newest.p95 / 1000
    power = values(scraped, "greenfleet_power_watts")
    assert power == {
        (("device", "gw-1"), ("method", "estimate")): newest.power_w,
        (("device", "gw-2"), ("method", "rapl")): fleet.of("gw-2")[-1].power_w,
    }


def test_tier_and_rollouts(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    tiers = values(scraped, "greenfleet_device_tier")
    current = {dict(k)["device"]: dict(k)["tier"] for k, v in tiers.items() if v == 1.0}
    assert current == {"gw-1": "fallback", "gw-2": "active"}
    assert sum(tiers.values()) == 2 and len(tiers) == 10  # five tiers per device
    state = values(scraped, "greenfleet_rollout_state")
    assert state[(("model", "vib:2.0.0"), ("rollout", "r1"), ("state", "running"))] == 1.0
    assert sum(state.values()) == 1.0
    devices = values(scraped, "greenfleet_rollout_devices")
    assert devices[(("rollout", "r1"), ("status", "updating"))] == 1.0
    assert sum(devices.values()) == 1.0


def test_openmetrics_on_request(fleet: Fleet) -> None:
    client = TestClient(
        create_app(fleet.home, dashboard=None),
        base_url="http://localhost",
        client=("127.0.0.1", 40000),
    )
    response = client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
