"""The controller's own settings: ``$GREENFLEET_HOME/controller.yaml`` (optional).

Only what the database cannot know lives here: the carbon intensity of each site's grid, used
to turn kWh into CO2e, each site's maintenance windows (controller.windows): when its devices
may switch models, and how many devices may fetch a model at once. A missing file means the
defaults; a bad one is an error naming the key.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controller.errors import InvalidRequest
from controller.windows import Window

# Devices fetching a model at once. The broker holds up to one Deploy window of chunks (16 x
# 256 KiB) per device that reads slower than chunks are fanned out, so 500 bounds that at ~2 GiB;
# 5,000 simulated devices at once ran a 24 GiB machine out of memory (docs/scale.md).
DEFAULT_MAX_CONCURRENT_TRANSFERS = 500

# IEA's 2023 world-average electricity carbon intensity is about 480 g CO2/kWh; an operator
# should set each site's own figure (its utility's or the national grid's).
DEFAULT_GRID_G_PER_KWH = 480.0


class SiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grid_g_co2e_per_kwh: float | None = Field(
        default=None, ge=0, description="Grid carbon intensity, g CO2e/kWh (default: the fleet's)."
    )
    maintenance: list[Window] = Field(
        default_factory=list, description="When devices may activate a model; none: any time."
    )


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_grid_g_co2e_per_kwh: float = Field(default=DEFAULT_GRID_G_PER_KWH, ge=0)
    sites: dict[str, SiteConfig] = Field(default_factory=dict)
    max_concurrent_transfers: int = Field(
        default=DEFAULT_MAX_CONCURRENT_TRANSFERS,
        ge=1,
        description="Devices that may fetch a model at once; the others wait their turn.",
    )

    def grid_intensity(self, site: str | None) -> float:
        config = self.sites.get(site or "")
        if config is None or config.grid_g_co2e_per_kwh is None:
            return self.default_grid_g_co2e_per_kwh
        return config.grid_g_co2e_per_kwh

    def windows(self, site: str | None) -> list[Window]:
        """The maintenance windows of ``site``; empty (always open) for a site not listed."""
        config = self.sites.get(site or "")
        return config.maintenance if config else []


def load_controller_config(path: Path) -> ControllerConfig:
    if not path.exists():
        return ControllerConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return ControllerConfig.model_validate(raw)
    except yaml.YAMLError as exc:
        raise InvalidRequest(f"{path} is not valid YAML: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise InvalidRequest(f"invalid controller config {path}: {problems}") from exc
