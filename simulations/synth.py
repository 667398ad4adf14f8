"""Synthetic hospitals: folders of real DICOM CT series that differ the way real sites do.

Each hospital gets a scanner profile (vendor tags, matrix, pixel spacing, slice thickness,
noise, reconstruction sharpness, stored-value encoding, transfer syntax), its own number of
patients, its own disease prevalence and its own lesion mix (non-IID). The synthetic public
collection (``population="public"``) has other scanners and another lesion mix than any
hospital. Positive patients have 1-2 lung nodules;
every slice showing a nodule is labelled ``nodule`` and its lesion mask is written to
``SITE/masks/<SOPInstanceUID>.png``. Labels go to ``SITE/labels.csv`` (one row per file).
Everything is a pure function of the seed.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless
from tqdm import tqdm

from fedct.common.errors import ConfigError
from fedct.simulations.dicom_writer import Scanner, SliceHeader, new_uid, write_ct_slice
from fedct.simulations.phantom import (
    LesionMix,
    nodule_radius_in_slice,
    random_anatomy,
    render_slice,
    scan,
)

log = logging.getLogger(__name__)

CLASSES = ("normal", "nodule")
# A slice counts as showing a nodule when its visible cross-section is at least this wide.
MIN_VISIBLE_DIAMETER_MM = 4.0


@dataclass(frozen=True)
class HospitalProfile:
    scanner: Scanner
    matrix: int
    fov_mm: float
    thickness_mm: float
    spacing_mm: float  # between exported slices: a sparse sample of the scan, so positive
    # patients also have slices without a nodule (the label is not the patient)
    slices: int
    noise_hu: float
    blur_mm: float
    patients: int
    prevalence: float
    lesions: LesionMix = field(default_factory=LesionMix)


# Three archetypes, cycled (with jitter) when more sites are asked for. Patient counts and
# prevalence differ on purpose: federated learning has to cope with non-IID sites.
PROFILES: tuple[HospitalProfile, ...] = (
    HospitalProfile(
        Scanner("SIEMENS", "SOMATOM-like (synthetic)", -1024.0, 1.0, False, None, kernel="B60f"),
        matrix=512,
        fov_mm=380.0,
        thickness_mm=1.5,
        spacing_mm=8.0,
        slices=6,
        noise_hu=18.0,
        blur_mm=0.6,
        patients=60,
        prevalence=0.5,
        # a screening programme: many ground-glass and small nodules
        lesions=LesionMix(ground_glass=0.6, diameter_mm=(4.0, 20.0), calcified=0.5),
    ),
    HospitalProfile(
        Scanner(
            "GE MEDICAL SYSTEMS",
            "LightSpeed-like (synthetic)",
            0.0,
            1.0,
            True,
            -3024.0,
            transfer_syntax=JPEG2000Lossless,
            kernel="STANDARD",
        ),
        matrix=384,
        fov_mm=360.0,
        thickness_mm=2.5,
        spacing_mm=10.0,
        slices=5,
        noise_hu=28.0,
        blur_mm=1.0,
        patients=40,
        prevalence=0.3,
        # incidental findings: small nodules, mostly solid
        lesions=LesionMix(ground_glass=0.2, diameter_mm=(4.0, 14.0), calcified=0.3),
    ),
    HospitalProfile(
        Scanner(
            "TOSHIBA",
            "Aquilion-like (synthetic)",
            -2048.0,
            1.0,
            False,
            None,
            transfer_syntax=RLELossless,
            kernel="FC13",
        ),
        matrix=256,
        fov_mm=400.0,
        thickness_mm=5.0,
        spacing_mm=10.0,
        slices=4,
        noise_hu=40.0,
        blur_mm=1.4,
        patients=30,
        prevalence=0.65,
        # oncology referrals: larger nodules, some ground-glass
        lesions=LesionMix(ground_glass=0.3, diameter_mm=(6.0, 30.0), calcified=0.6),
    ),
)

# The synthetic public collection (what LIDC-IDRI is in practice): other scanner generations
# than any hospital's (smooth and older kernels, thin and very thick slices, another vendor's
# encoding) and another lesion mix: the nodules readers marked with confidence, solid and
# mostly large, almost no ground glass, few small ones. What the hospitals see and it lacks is
# what a federation can teach (docs/worlds.md, The demo's world).
PUBLIC_PROFILES: tuple[HospitalProfile, ...] = (
    HospitalProfile(
        Scanner("Philips", "Brilliance-like (synthetic)", -1000.0, 1.0, True, None, kernel="B"),
        matrix=512,
        fov_mm=350.0,
        thickness_mm=2.0,
        spacing_mm=8.0,
        slices=6,
        noise_hu=12.0,
        blur_mm=0.9,
        patients=60,
        prevalence=0.5,
        lesions=LesionMix(ground_glass=0.0, diameter_mm=(8.0, 30.0)),
    ),
    HospitalProfile(
        Scanner("GE MEDICAL SYSTEMS", "HiSpeed-like (synthetic)", -1024.0, 1.0, False, None),
        matrix=512,
        fov_mm=420.0,
        thickness_mm=7.0,
        spacing_mm=10.0,
        slices=4,
        noise_hu=22.0,
        blur_mm=1.6,
        patients=50,
        prevalence=0.5,
        lesions=LesionMix(ground_glass=0.05, diameter_mm=(10.0, 30.0)),
    ),
    HospitalProfile(
        Scanner("SIEMENS", "Sensation-like (synthetic)", -1024.0, 1.0, False, None, kernel="B30f"),
        matrix=512,
        fov_mm=360.0,
        thickness_mm=3.0,
        spacing_mm=8.0,
        slices=5,
        noise_hu=15.0,
        blur_mm=1.1,
        patients=50,
        prevalence=0.5,
        lesions=LesionMix(ground_glass=0.0, diameter_mm=(6.0, 30.0)),
    ),
)
POPULATIONS = ("hospitals", "public")


@dataclass(frozen=True)
class SynthSettings:
    sites: int = 3
    seed: int = 0
    scale: float = 1.0  # multiplies every site's number of patients
    matrix_cap: int | None = None  # e.g. 64 for tiny test sites
    population: str = "hospitals"  # or "public": the synthetic public collection

    def __post_init__(self) -> None:
        if self.population not in POPULATIONS:
            raise ConfigError(
                f"unknown population {self.population!r}; choose one of {', '.join(POPULATIONS)}"
            )
        if not 1 <= self.sites <= 50:
            raise ConfigError(f"number of synthetic sites must be 1..50, got {self.sites}")
        if self.scale <= 0:
            raise ConfigError(f"patient scale must be positive, got {self.scale}")


def hospital_profiles(settings: SynthSettings) -> list[tuple[str, HospitalProfile]]:
    rng = np.random.default_rng([settings.seed, 7])
    profiles, prefix = (
        (PUBLIC_PROFILES, "public") if settings.population == "public" else (PROFILES, "hospital")
    )
    out = []
    for i in range(settings.sites):
        base = profiles[i % len(profiles)]
        profile = (
            base
            if i < len(profiles)
            else replace(
                base,
                patients=int(base.patients * rng.uniform(0.6, 1.4)),
                prevalence=float(np.clip(base.prevalence + rng.normal(0, 0.12), 0.15, 0.85)),
                noise_hu=base.noise_hu * float(rng.uniform(0.8, 1.25)),
            )
        )
        patients = max(4, round(profile.patients * settings.scale))
        matrix = min(profile.matrix, settings.matrix_cap or profile.matrix)
        profile = replace(profile, patients=patients, matrix=matrix)
        out.append((f"{prefix}-{_letters(i)}", profile))
    return out


def _letters(i: int) -> str:
    name = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        name = chr(ord("a") + r) + name
    return name


def write_hospitals(out: Path, settings: SynthSettings, *, progress: bool = True) -> list[Path]:
    """Write every synthetic hospital under ``out``; returns their folders."""
    sites = []
    for index, (name, profile) in enumerate(hospital_profiles(settings)):
        site = out / name
        if site.exists() and any(site.iterdir()):
            raise ConfigError(f"{site} already exists and is not empty; choose another --out")
        write_hospital(site, profile, seed=settings.seed, site_index=index, progress=progress)
        sites.append(site)
    return sites


def write_hospital(
    site: Path, profile: HospitalProfile, *, seed: int, site_index: int, progress: bool = True
) -> None:
    rng = np.random.default_rng([seed, site_index, 1])
    n_pos = round(profile.patients * profile.prevalence)
    positive = np.zeros(profile.patients, dtype=bool)
    positive[rng.permutation(profile.patients)[:n_pos]] = True
    pixel_mm = profile.fov_mm / profile.matrix
    rows: list[tuple[str, str]] = []
    site.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        range(profile.patients),
        desc=f"writing {site.name}",
        unit="patient",
        disable=not progress or None,
        leave=False,
    )
    for p in bar:
        rows += _write_patient(
            site,
            profile,
            site_index,
            p,
            bool(positive[p]),
            pixel_mm,
            np.random.default_rng([seed, site_index, 2, p]),
        )
    with (site / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    n_nod = sum(1 for _, label in rows if label == "nodule")
    log.info(
        "%s: %d patients (%d with nodules), %d slices (%d showing a nodule), %s",
        site.name,
        profile.patients,
        n_pos,
        len(rows),
        n_nod,
        profile.scanner.model,
    )


def _write_patient(
    site: Path,
    profile: HospitalProfile,
    site_index: int,
    p: int,
    positive: bool,
    pixel_mm: float,
    rng: np.random.Generator,
) -> list[tuple[str, str]]:
    t = profile.thickness_mm
    z0 = float(rng.uniform(-180, -120))
    step = profile.spacing_mm
    z_range = (z0, z0 + step * (profile.slices - 1))
    anatomy = random_anatomy(
        rng,
        z_range=z_range,
        nodules=int(rng.integers(1, 3)) if positive else 0,
        lesions=profile.lesions,
        slice_z=tuple(z_range[0] + k * step for k in range(profile.slices)),
    )
    patient_id = f"SYN{site_index:02d}{p:04d}"
    study = new_uid(f"{patient_id}/study")
    series = new_uid(f"{patient_id}/series")
    folder = f"{patient_id}/{series[-12:]}"
    half = profile.matrix * pixel_mm / 2
    rows = []
    for k in range(profile.slices):
        z = z_range[0] + k * step
        image, mask = render_slice(
            anatomy, z=z, matrix=profile.matrix, pixel_mm=pixel_mm, thickness=t
        )
        hu = scan(image, rng, pixel_mm=pixel_mm, blur_mm=profile.blur_mm, noise_hu=profile.noise_hu)
        if profile.scanner.padding_hu is not None:  # outside the reconstruction circle
            yy, xx = np.ogrid[: profile.matrix, : profile.matrix]
            c = (profile.matrix - 1) / 2
            hu[(yy - c) ** 2 + (xx - c) ** 2 > (profile.matrix / 2) ** 2] = (
                profile.scanner.padding_hu
            )
        sop = new_uid(f"{patient_id}/{k}")
        header = SliceHeader(
            patient_name=f"SYNTHETIC^PATIENT{site_index:02d}{p:04d}",
            patient_id=patient_id,
            study_uid=study,
            series_uid=series,
            sop_uid=sop,
            instance_number=k + 1,
            position_mm=(-half, -half, z),
            pixel_spacing_mm=pixel_mm,
            slice_thickness_mm=t,
            institution=f"Synthetic Hospital {site.name}",
        )
        rel = f"{folder}/IM{k + 1:04d}.dcm"
        write_ct_slice(site / rel, hu, header, profile.scanner)
        visible = any(
            2 * nodule_radius_in_slice(n, z, t)[0] >= MIN_VISIBLE_DIAMETER_MM
            for n in anatomy.nodules
        )
        if visible and mask.any():
            (site / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(site / "masks" / f"{sop}.png")
        rows.append((rel, CLASSES[1] if visible and mask.any() else CLASSES[0]))
    return rows
