"""World "ward" (held out): three hospitals like an independent user's first test set.

Class folders with one sub-folder per patient (``SITE/<class>/<patient>/IMG0003.dcm``), six
slices a patient, small matrices (128-160 px) over wide fields of view.

Anatomy: the body outline is a random smooth radial function with a flattened back; the
subcutaneous fat is thicker where a second radial function says so. Each lung is a lobe shape
whose border is roughened by a smooth 3-D random field; vessels are where two other smooth 3-D
fields are both near zero (tubes around the curves where they cross, so a slice shows dots and
short streaks that continue from slice to slice). A heart that grows towards the diaphragm, a
descending aorta, a rounded-square vertebra with cortex, canal and spinous process, a sternum,
tangential rib sections and the scapulae. One site's scan is contrast-enhanced (bright blood).

Nodules are spheres (8-30 mm) whose share of the slab is computed exactly per pixel. Noise is
quantum-like: its level grows with the square root of the local attenuation and with the
attenuation along each row (the lateral rays are the longest). Each site stores pixel values
differently (offsets of -2048 or -1024 or signed with padding outside the reconstruction circle).
A slice is labelled ``nodule`` when its central plane cuts a nodule at least 4 mm across.

It is this long because a world shares no code with the other worlds beyond :mod:`.dicom_out`
(docs/worlds.md), so its scanners, anatomy, rendering and noise stay in this one module.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from fedct.simulations.worlds.dicom_out import (
    Scanner,
    SiteRecord,
    SliceGeometry,
    SliceIds,
    Storage,
    WorldOptions,
    make_uid,
    require_empty,
    write_ct_slice,
    write_mask,
)

log = logging.getLogger(__name__)

WORLD = "ward"
_WORLD_KEY = 0x77617264  # this world's random streams, apart from every other world's
MIN_LABEL_DIAMETER_MM = 4.0
NODULE_MM = (8.0, 30.0)  # diameter, log-uniform
SLICES = 6
_FIELD_MM = 7.0  # cell size of the smooth random fields


@dataclass(frozen=True)
class WardSite:
    name: str
    scanner: Scanner
    storage: Storage
    matrix: int
    fov_mm: float
    spacing_mm: float
    thickness_mm: float
    noise_hu: float
    lateral_noise: float  # how much the row attenuation raises the noise
    contrast: bool  # contrast-enhanced blood
    patients: int
    prevalence: float


SITES: tuple[WardSite, ...] = (
    WardSite(
        "ward-1",
        Scanner("Kestrel Medical", "KX Scout (synthetic)", "St Ward Hospital 1", "B31", 120.0),
        Storage(ExplicitVRLittleEndian, signed=False, bits_stored=16, intercept=-2048.0),
        matrix=128,
        fov_mm=360.0,
        spacing_mm=4.0,
        thickness_mm=3.0,
        noise_hu=16.0,
        lateral_noise=0.6,
        contrast=False,
        patients=28,
        prevalence=0.63,
    ),
    WardSite(
        "ward-2",
        Scanner("Anselm", "Vista 32 (synthetic)", "Ward District General", "BODY", 100.0),
        Storage(RLELossless, signed=True, bits_stored=16, intercept=0.0, padding_hu=-2000.0),
        matrix=144,
        fov_mm=380.0,
        spacing_mm=3.5,
        thickness_mm=3.5,
        noise_hu=22.0,
        lateral_noise=1.0,
        contrast=True,
        patients=36,
        prevalence=0.55,
    ),
    WardSite(
        "ward-3",
        Scanner("Kestrel Medical", "KX Wide (synthetic)", "Ward University Clinic", "C20", 140.0),
        Storage(ImplicitVRLittleEndian, signed=False, bits_stored=12, intercept=-1024.0),
        matrix=160,
        fov_mm=420.0,
        spacing_mm=5.0,
        thickness_mm=5.0,
        noise_hu=11.0,
        lateral_noise=0.4,
        contrast=False,
        patients=40,
        prevalence=0.68,
    ),
)


@dataclass(frozen=True)
class Calibration:
    """One scanner's CT numbers (HU)."""

    lung: float
    fat: float
    muscle: float
    blood: float
    cancellous: float
    cortex: float


@dataclass(frozen=True)
class Nodule:
    x: float
    y: float
    z: float
    radius: float
    hu: float


@dataclass(frozen=True)
class Fields:
    """Smooth unit-variance 3-D random fields on a coarse grid (z, y, x)."""

    border: np.ndarray
    tube_a: np.ndarray
    tube_b: np.ndarray
    z0: float  # z of the first plane (mm)


@dataclass(frozen=True)
class Patient:
    cx: float
    cy: float
    ax: float  # body half-width (mm)
    ay: float  # body half-depth
    outline: tuple[tuple[float, float], ...]  # (amplitude, phase) of harmonics 2, 3, ...
    fat_mm: float
    fat_wave: tuple[float, float]  # amplitude, phase of the fat thickness around the body
    back: float  # y (mm) below which the back lies flat on the table
    lobes: tuple[tuple[float, float, float, float], ...]  # cx, cy, a, b of each lung
    heart: tuple[float, float, float]  # cx, cy, radius at mid-slab
    ribs: tuple[float, ...]  # rib angles (radians)
    nodules: tuple[Nodule, ...]
    fields: Fields
    z_mid: float
    hu: Calibration


def write_site(folder: Path, site: WardSite, *, options: WorldOptions, index: int) -> SiteRecord:
    require_empty(folder)
    rng = np.random.default_rng([options.seed, _WORLD_KEY, index])
    blood = rng.uniform(160, 220) if site.contrast else rng.uniform(30, 45)
    hu = Calibration(
        lung=rng.uniform(-860, -800),
        fat=rng.uniform(-110, -70),
        muscle=rng.uniform(40, 60),
        blood=blood,
        cancellous=rng.uniform(180, 280),
        cortex=rng.uniform(700, 1000),
    )
    patients = options.patient_count(site.patients)
    sick = np.zeros(patients, dtype=bool)
    sick[rng.choice(patients, size=max(1, round(site.prevalence * patients)), replace=False)] = True
    if patients >= 2 and sick.all():
        sick[int(rng.integers(patients))] = False
    positives = positive_patients = 0
    diameters: list[float] = []
    for p in range(patients):
        prng = np.random.default_rng([options.seed, _WORLD_KEY, index, 1000 + p])
        shown, widest = _write_patient(folder, site, index, p, bool(sick[p]), hu, prng)
        positives += shown
        positive_patients += shown > 0
        diameters += widest
    record = SiteRecord(
        path=folder,
        layout="folders",
        matrix=site.matrix,
        fov_mm=site.fov_mm,
        slice_spacing_mm=site.spacing_mm,
        transfer_syntax=str(site.storage.transfer_syntax),
        patients=patients,
        positive_patients=positive_patients,
        slices=patients * SLICES,
        positive_slices=positives,
        lesion_diameters_mm=tuple(diameters),
    )
    log.info(
        "%s: %d patients, %d slices, %.0f%% showing a nodule",
        site.name,
        patients,
        record.slices,
        100 * record.positive_fraction,
    )
    return record


def _write_patient(
    folder: Path,
    site: WardSite,
    index: int,
    p: int,
    sick: bool,
    hu: Calibration,
    rng: np.random.Generator,
) -> tuple[int, list[float]]:
    z_first = float(rng.uniform(-90.0, -30.0))
    zs = [z_first + k * site.spacing_mm for k in range(SLICES)]
    patient = _random_patient(rng, site=site, zs=zs, sick=sick, hu=hu)
    pixel = site.fov_mm / site.matrix
    corner = -site.fov_mm / 2 + pixel / 2
    patient_id = f"W{index + 1}-{p:04d}"
    uid = f"{WORLD}/{index}/{p}"
    study, series = make_uid(uid, "study"), make_uid(uid, "series")
    frame_ref = make_uid(uid, "for")
    widest: dict[int, float] = {}
    shown = 0
    for k, z in enumerate(zs):
        image, outside, mask, cut = _render(patient, site=site, z=z, rng=rng)
        sop = make_uid(uid, "image", k)
        label = "nodule" if cut else "normal"
        write_ct_slice(
            folder / label / patient_id / f"IMG{k + 1:04d}.dcm",
            image,
            ids=SliceIds(
                patient_id=patient_id,
                patient_name=f"WARD^TEST{index + 1}^{p:04d}",
                study_uid=study,
                series_uid=series,
                sop_uid=sop,
                frame_of_reference_uid=frame_ref,
                series_number=201,
                instance_number=k + 1,
                study_date="20231115",
                accession=f"W{index + 1}{p:05d}",
            ),
            geometry=SliceGeometry((corner, corner, z), pixel, site.thickness_mm),
            scanner=site.scanner,
            storage=site.storage,
            outside=outside,
        )
        if cut:
            shown += 1
            write_mask(folder, sop, mask)
            for i, d in cut.items():
                widest[i] = max(widest.get(i, 0.0), d)
    return shown, [widest[i] for i in sorted(widest)]


def _smooth_fields(
    rng: np.random.Generator, *, fov_mm: float, zs: list[float], count: int
) -> list[np.ndarray]:
    cells = math.ceil(fov_mm / _FIELD_MM) + 2
    planes = math.ceil((zs[-1] - zs[0]) / _FIELD_MM) + 5
    # a Gaussian along z as a small matrix, in-plane with cv2 (no SciPy needed)
    index = np.arange(planes)
    along_z = np.exp(-((index[:, None] - index[None, :]) ** 2) / (2 * 1.2**2))
    along_z /= along_z.sum(axis=1, keepdims=True)
    out = []
    for _ in range(count):
        volume = rng.standard_normal((planes, cells, cells)).astype(np.float32)
        volume = np.stack([cv2.GaussianBlur(plane, (0, 0), 1.2) for plane in volume])
        volume = np.tensordot(along_z.astype(np.float32), volume, axes=(1, 0))
        out.append((volume - volume.mean()) / max(float(volume.std()), 1e-6))
    return out


def _random_patient(
    rng: np.random.Generator, *, site: WardSite, zs: list[float], sick: bool, hu: Calibration
) -> Patient:
    half = site.fov_mm / 2
    ax = rng.uniform(150, 178) * min(1.0, half / 185)
    ay = ax * rng.uniform(0.64, 0.76)
    cx, cy = rng.uniform(-6, 6), rng.uniform(-22, -10)
    outline = tuple(
        (float(rng.normal(0, 0.035 / k)), float(rng.uniform(0, 2 * math.pi))) for k in range(2, 6)
    )
    lung_a, lung_b = ax * rng.uniform(0.27, 0.31), ay * rng.uniform(0.58, 0.66)
    gap = ax * rng.uniform(0.2, 0.25)
    lobes = (
        (cx - gap - lung_a * 0.8, cy - ay * 0.06, lung_a, lung_b),
        (cx + gap + lung_a * 0.8, cy - ay * 0.06, lung_a * rng.uniform(0.9, 1.0), lung_b),
    )
    angles = np.cumsum(rng.uniform(0.3, 0.45, size=7)) + rng.uniform(0.15, 0.3)
    ribs = tuple(float(a) for a in np.concatenate([angles, math.pi - angles]))
    fields = _smooth_fields(rng, fov_mm=site.fov_mm, zs=zs, count=3)
    nodules: list[Nodule] = []
    if sick:
        for _ in range(1 if rng.uniform() < 0.5 else 2):
            diameter = math.exp(rng.uniform(*np.log(NODULE_MM)))
            lx, ly, la, lb = lobes[int(rng.integers(2))]
            room = max(0.75 - diameter / 2 / min(la, lb), 0.15)
            rho, theta = room * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
            solid = rng.uniform() < 0.6
            nodules.append(
                Nodule(
                    lx + rho * la * math.cos(theta),
                    ly + rho * lb * math.sin(theta),
                    rng.uniform(zs[0] - diameter / 4, zs[-1] + diameter / 4),
                    diameter / 2,
                    rng.uniform(0, 50) if solid else rng.uniform(-700, -450),
                )
            )
    return Patient(
        cx=cx,
        cy=cy,
        ax=ax,
        ay=ay,
        outline=outline,
        fat_mm=rng.uniform(5, 20),
        fat_wave=(rng.uniform(0.2, 0.6), rng.uniform(0, 2 * math.pi)),
        back=cy + ay * rng.uniform(0.86, 0.94),
        lobes=lobes,
        heart=(cx + ax * 0.12, cy - ay * 0.12, ax * rng.uniform(0.19, 0.23)),
        ribs=ribs,
        nodules=tuple(nodules),
        fields=Fields(fields[0], fields[1], fields[2], z0=zs[0] - 2 * _FIELD_MM),
        z_mid=(zs[0] + zs[-1]) / 2,
        hu=hu,
    )


def _field_slice(volume: np.ndarray, *, z: float, z0: float, fov_mm: float, n: int) -> np.ndarray:
    """``volume`` at height ``z``, interpolated onto the ``n`` x ``n`` image grid."""
    position = min(max((z - z0) / _FIELD_MM, 0.0), volume.shape[0] - 1.001)
    k = int(position)
    frac = position - k
    plane = (1 - frac) * volume[k] + frac * volume[k + 1]
    cells = volume.shape[1]
    # the field's cells span (cells * _FIELD_MM) mm centred on the image
    grid_mm = cells * _FIELD_MM
    big = cv2.resize(
        plane,
        (0, 0),
        fx=n * grid_mm / fov_mm / cells,
        fy=n * grid_mm / fov_mm / cells,
        interpolation=cv2.INTER_CUBIC,
    )
    start = (big.shape[0] - n) // 2
    return big[start : start + n, start : start + n]


def _render(
    pt: Patient, *, site: WardSite, z: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, float]]:
    """(HU image, outside the reconstruction circle, lesion mask, {nodule: diameter mm})."""
    n = site.matrix
    pixel = site.fov_mm / n
    axis = (np.arange(n, dtype=np.float32) + 0.5) * pixel - site.fov_mm / 2
    xx, yy = np.meshgrid(axis, axis)
    hu = pt.hu
    edge = pixel * 0.6
    img: np.ndarray = np.full((n, n), -1000.0, dtype=np.float32)

    # table: a flat slab with a dense top sheet
    table = pt.back + 8
    across = np.abs(xx - pt.cx) < pt.ax * 1.1
    img[across & (yy > table) & (yy < table + 4)] = 300.0
    img[across & (yy >= table + 4) & (yy < table + 22)] = -750.0

    # body: radial function with a flat back
    u, v = (xx - pt.cx) / pt.ax, (yy - pt.cy) / pt.ay
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    radius = np.ones_like(rho)
    for k, (amp, phase) in enumerate(pt.outline, start=2):
        radius += amp * np.cos(k * theta + phase)
    scale = min(pt.ax, pt.ay)
    body = np.clip(0.5 + (radius - rho) * scale / (2 * edge), 0, 1)
    body *= np.clip(0.5 + (pt.back - yy) / (2 * edge), 0, 1)
    amp, phase = pt.fat_wave
    fat = pt.fat_mm * (1 + amp * np.sin(theta + phase)) / scale
    inner = np.clip(0.5 + (radius - fat - rho) * scale / (2 * edge), 0, 1)
    inner *= np.clip(0.5 + (pt.back - pt.fat_mm * 0.5 - yy) / (2 * edge), 0, 1)
    img += body * (hu.fat - img)
    img += inner * (hu.muscle - img)

    # lungs: lobes with borders roughened by a smooth field
    f = pt.fields
    border = _field_slice(f.border, z=z, z0=f.z0, fov_mm=site.fov_mm, n=n)
    lungs = np.zeros_like(img)
    for lx, ly, la, lb in pt.lobes:
        g = np.hypot((xx - lx) / la, (yy - ly) / lb) + 0.07 * border
        lungs = np.maximum(lungs, np.clip(0.5 + (1 - g) * min(la, lb) / (2 * edge), 0, 1))
    hx, hy, hr = pt.heart
    hr *= 1 + 0.012 * (pt.z_mid - z)  # larger towards the diaphragm (z falls caudally)
    heart = np.clip(0.5 + (hr - np.hypot((xx - hx) * 0.9, yy - hy)) / (2 * edge), 0, 1)
    lungs *= 1 - heart
    img += lungs * (hu.lung - img)
    img += heart * (hu.blood - img)
    sx, sy = pt.cx, pt.cy + pt.ay * 0.42
    aorta = np.clip(0.5 + (12 - np.hypot(xx - (sx + 22), yy - (sy - 22))) / (2 * edge), 0, 1)
    img += aorta * (hu.blood - img)

    # vessels: tubes around the curves where two smooth fields both vanish
    a = _field_slice(f.tube_a, z=z, z0=f.z0, fov_mm=site.fov_mm, n=n)
    b = _field_slice(f.tube_b, z=z, z0=f.z0, fov_mm=site.fov_mm, n=n)
    hilum = np.hypot((xx - pt.cx) / pt.ax, (yy - pt.cy) / pt.ay)
    width = 0.15 * (1.6 - np.clip(hilum, 0, 1))
    tubes = np.exp(-(a * a + b * b) / (2 * width * width))
    img += lungs * tubes * 0.85 * (hu.blood - img)

    _bones(img, xx, yy, pt, inside=inner, sx=sx, sy=sy, z=z, edge=edge)

    mask = np.zeros((n, n), dtype=bool)
    cut: dict[int, float] = {}
    lo, hi = z - site.thickness_mm / 2, z + site.thickness_mm / 2
    for i, nod in enumerate(pt.nodules):
        if abs(z - nod.z) > nod.radius + site.thickness_mm / 2:
            continue
        d2 = (xx - nod.x) ** 2 + (yy - nod.y) ** 2
        chord = np.sqrt(np.maximum(nod.radius**2 - d2, 0.0))
        share = np.clip(np.minimum(hi, nod.z + chord) - np.maximum(lo, nod.z - chord), 0, None)
        share = share / site.thickness_mm * (chord > 0) * np.maximum(lungs, 0.5)
        img += share * np.maximum(nod.hu - img, 0 if nod.hu < -300 else -1e9)
        central = nod.radius**2 - (z - nod.z) ** 2
        if central > 0 and 2 * math.sqrt(central) >= MIN_LABEL_DIAMETER_MM:
            disk = d2 <= central
            if disk.any():
                mask |= disk
                cut[i] = 2 * math.sqrt(central)

    img = cv2.GaussianBlur(img, (0, 0), 0.55)
    # quantum-like noise: sigma ~ sqrt(local attenuation), more along long (lateral) rays
    mu = np.clip((img + 1000.0) / 1000.0, 0, None)
    local = cv2.GaussianBlur(mu, (0, 0), 6.0 / pixel)
    rows = mu.sum(axis=1, keepdims=True) * pixel / (2 * pt.ax)
    sigma = site.noise_hu * np.sqrt(0.1 + local) * (1 + site.lateral_noise * rows)
    noise = cv2.GaussianBlur(rng.standard_normal((n, n), dtype=np.float32), (0, 0), 0.5)
    img += noise * (sigma / float(noise.std()))
    circle = np.hypot(xx, yy) > site.fov_mm / 2
    img[circle] = -1000.0
    return img, circle, mask, cut


def _bones(
    img: np.ndarray,
    xx: np.ndarray,
    yy: np.ndarray,
    pt: Patient,
    *,
    inside: np.ndarray,
    sx: float,
    sy: float,
    z: float,
    edge: float,
) -> None:
    hu = pt.hu

    def cover(distance: np.ndarray) -> np.ndarray:  # bone stays inside the body wall
        return np.clip(0.5 - distance / (2 * edge), 0, 1) * inside

    # vertebra: rounded square body (cortex around cancellous bone), canal, spinous process
    square = (np.abs(xx - sx) ** 4 + np.abs(yy - sy) ** 4) ** 0.25
    img += cover(square - 18) * (hu.cortex - img)
    img += cover(square - 15) * (hu.cancellous - img)
    img += cover(np.hypot(xx - sx, yy - sy - 26) - 7) * (hu.muscle - 20 - img)
    process = np.hypot((xx - sx) / 5, (yy - sy - 42) / 9) - 1
    img += cover(process * 5) * (hu.cortex * 0.8 - img)
    front = pt.cy - pt.ay + pt.fat_mm + 10
    img += cover((np.hypot((xx - pt.cx) / 11, (yy - front) / 5) - 1) * 5) * (hu.cortex * 0.7 - img)
    # rib sections: tangential ellipses inside the body wall, sliding with z
    for angle in pt.ribs:
        t = angle + 0.004 * (z - pt.z_mid)
        rx = pt.cx + (pt.ax - pt.fat_mm - 9) * math.cos(t)
        ry = pt.cy - (pt.ay - pt.fat_mm - 9) * math.sin(t)
        if ry > sy + 10:
            continue
        c, s = math.cos(t), math.sin(t)
        du, dv = xx - rx, yy - ry
        along = (-s * du - c * dv) / 8.0
        across = (c * du - s * dv) / 3.5
        img += cover((np.hypot(along, across) - 1) * 3.5) * (hu.cortex * 0.75 - img)
    # scapulae: long bars behind the posterior ribs
    for side in (-1.0, 1.0):
        bx, by = pt.cx + side * pt.ax * 0.56, pt.cy + pt.ay * 0.6
        c, s = math.cos(side * 0.45), math.sin(side * 0.45)
        du, dv = xx - bx, yy - by
        bar = np.hypot((c * du + s * dv) / 24, (-s * du + c * dv) / 3.5) - 1
        img += cover(bar * 4) * (hu.cortex * 0.6 - img)
