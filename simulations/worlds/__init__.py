"""Independent evaluation worlds: synthetic hospitals that FedCT's own generator did not make.

FedCT's defaults were first chosen on ``simulations/synth.py``'s hospitals; judging them there
again would flatter them. These worlds are written from scratch (no code, constants or
anatomy shared with that generator, nor between the worlds beyond :mod:`.dicom_out`), so
defaults can be tuned on the ``tuning`` world and judged on the ``held-out`` ones.

``write_world(name, out)`` writes one sub-folder per hospital under ``out``; everything written
is a pure function of the seed. See docs/worlds.md for what each world models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedct.common.errors import ConfigError
from fedct.simulations.worlds import harbor, meadow, ward
from fedct.simulations.worlds.dicom_out import SiteRecord, WorldOptions

__all__ = [
    "WORLDS",
    "SiteRecord",
    "WorldOptions",
    "WorldSpec",
    "build_world",
    "world_spec",
    "write_world",
]


@dataclass(frozen=True)
class WorldSpec:
    """A registered world: what it models, how to write it, and what it is for."""

    name: str
    description: str
    role: Literal["tuning", "held-out"]
    layout: Literal["folders", "csv"]
    sites: tuple[Any, ...]  # the world's hospital profiles, in order
    write_site: Callable[..., SiteRecord]  # (folder, profile, *, options, index)

    @property
    def hospitals(self) -> int:
        return len(self.sites)


WORLDS: dict[str, WorldSpec] = {
    spec.name: spec
    for spec in (
        WorldSpec(
            "meadow",
            "3 hospitals, class folders; superellipse torso, branching 3-D vessel tree, "
            "8-10 slices a patient, 160-256 px, nodules 6-24 mm, ~30% positive slices",
            "tuning",
            "folders",
            meadow.SITES,
            meadow.write_site,
        ),
        WorldSpec(
            "ward",
            "3 hospitals, class folders; radial-function body, noise-field lungs, "
            "attenuation-dependent noise, 6 slices a patient, 128-160 px, nodules 8-30 mm, "
            "~30-45% positive slices",
            "held-out",
            "folders",
            ward.SITES,
            ward.write_site,
        ),
        WorldSpec(
            "harbor",
            "3 hospitals, labels.csv with extensionless PACS paths; metaball anatomy, "
            "tortuous vessels, power-law noise, 12-16 thin slices, 256 px, small nodules "
            "5-12 mm, ~13% positive slices",
            "held-out",
            "csv",
            harbor.SITES,
            harbor.write_site,
        ),
    )
}


def world_spec(name: str) -> WorldSpec:
    """The registered world ``name``; :class:`ConfigError` listing the known ones otherwise."""
    try:
        return WORLDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown world {name!r}; known worlds: {', '.join(sorted(WORLDS))}"
        ) from None


def build_world(name: str, out: Path, options: WorldOptions) -> list[SiteRecord]:
    """Write world ``name`` under ``out``; returns what was written, hospital by hospital."""
    spec = world_spec(name)
    if options.sites is not None and options.sites > spec.hospitals:
        raise ConfigError(
            f"world {name!r} has {spec.hospitals} hospitals, {options.sites} were asked for; "
            f"ask for at most {spec.hospitals}"
        )
    out.mkdir(parents=True, exist_ok=True)
    chosen = spec.sites[: options.sites] if options.sites is not None else spec.sites
    return [
        spec.write_site(out / site.name, site, options=options, index=i)
        for i, site in enumerate(chosen)
    ]


def write_world(name: str, out: Path, *, seed: int = 0, scale: float = 1.0) -> list[Path]:
    """Write world ``name`` under ``out`` (one sub-folder per hospital); returns the folders."""
    records = build_world(name, out, WorldOptions(seed=seed, scale=scale))
    return [r.path for r in records]
