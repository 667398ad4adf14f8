"""World "harbor" (held out): thin-slice chest CT with small nodules, filed as a PACS export.

Each hospital has a ``labels.csv`` (``path,label``) beside extensionless, nested file names in
its own PACS style (``DICOM/S0001/SE0002/IM00017``, ``IMAGES/<SOPInstanceUID>``,
``PACS/<key>/<series>/<instance>``). 256 px over a 330-360 mm field of view, 12-16 slices a
patient 2-3 mm apart, so a nodule of 5-12 mm spans one to four labelled slices and is 1-4 px
wide once the whole field of view is shrunk to a 96 px grid.

Anatomy: every soft outline is an iso-contour of a sum of Gaussian "metaballs" (body, muscle
under the fat, each lung, the heart) whose centres drift with z. Ribs are oblique hoops: a thin
slice cuts each one along an arc. Vessels are tortuous 3-D random walks splatted as Gaussian
cross-sections where they pierce the slice. Solid nodules are lobulated; ground-glass ones are
Gaussian haze. No table in the displayed field of view. Noise has a ramp-times-apodisation power
spectrum, as filtered back-projection leaves it. Storage: JPEG 2000 lossless with signed values;
unsigned with intercept -1024; unsigned with slope 0.5.

A slice is labelled ``nodule`` when its central plane cuts a nodule through its middle part (a
cross-section at least 75 % of the nodule's diameter and 3 mm); thinner caps stay ``normal``.

It is this long because a world shares no code with the other worlds beyond :mod:`.dicom_out`
(docs/worlds.md), so its scanners, anatomy, rendering and noise stay in this one module.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

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
    write_labels_csv,
    write_mask,
)

log = logging.getLogger(__name__)

WORLD = "harbor"
_WORLD_KEY = 0x68617262  # this world's random streams, apart from every other world's
MATRIX = 256
LABEL_SHARE = 0.75  # of the nodule's diameter, for a slice to be labelled
MIN_LABEL_MM = 3.0

# (patient, study UID, series number, instance index, SOP UID) -> path inside the site
Namer = Callable[[int, str, int, int, str], str]


def _dicomdir_style(p: int, study: str, series: int, k: int, sop: str) -> str:
    return f"DICOM/S{p + 1:04d}/SE{series:04d}/IM{k + 1:05d}"


def _uid_style(p: int, study: str, series: int, k: int, sop: str) -> str:
    return f"IMAGES/{sop}"


def _pacs_style(p: int, study: str, series: int, k: int, sop: str) -> str:
    key = hashlib.blake2b(study.encode(), digest_size=4).hexdigest().upper()
    return f"PACS/{key}/{series}/{k + 1:08d}"


@dataclass(frozen=True)
class HarborSite:
    name: str
    scanner: Scanner
    storage: Storage
    namer: Namer
    fov_mm: float
    slices: int
    spacing_mm: float
    thickness_mm: float
    psf_mm: float  # scanner blur (Gaussian sigma)
    noise_hu: float
    cutoff: float  # apodisation cut-off of the noise spectrum (cycles/pixel)
    patients: int
    prevalence: float


SITES: tuple[HarborSite, ...] = (
    HarborSite(
        "harbor-a",
        Scanner("Tidewater", "TW Spiral 64 (synthetic)", "Harbor A Medical Centre", "YB", 120.0),
        Storage(JPEG2000Lossless, signed=True, bits_stored=16, intercept=0.0),
        _dicomdir_style,
        fov_mm=345.0,
        slices=14,
        spacing_mm=2.5,
        thickness_mm=2.5,
        psf_mm=0.55,
        noise_hu=18.0,
        cutoff=0.32,
        patients=30,
        prevalence=0.5,
    ),
    HarborSite(
        "harbor-b",
        Scanner("Quayside", "QS-128 (synthetic)", "Harbor B Hospital", "LUNG", 110.0),
        Storage(ExplicitVRLittleEndian, signed=False, bits_stored=12, intercept=-1024.0),
        _uid_style,
        fov_mm=360.0,
        slices=12,
        spacing_mm=3.0,
        thickness_mm=3.0,
        psf_mm=0.8,
        noise_hu=25.0,
        cutoff=0.22,
        patients=26,
        prevalence=0.9,
    ),
    HarborSite(
        "harbor-c",
        Scanner("Tidewater", "TW Spiral 16 (synthetic)", "Harbor C Clinic", "YC", 130.0),
        Storage(ExplicitVRLittleEndian, signed=False, bits_stored=16, slope=0.5, intercept=-1024),
        _pacs_style,
        fov_mm=330.0,
        slices=16,
        spacing_mm=2.0,
        thickness_mm=1.5,
        psf_mm=0.5,
        noise_hu=32.0,
        cutoff=0.4,
        patients=38,
        prevalence=0.6,
    ),
)


@dataclass(frozen=True)
class Numbers:
    """One scanner's CT numbers (HU)."""

    lung: float
    fat: float
    muscle: float
    blood: float
    cancellous: float
    cortex: float


@dataclass(frozen=True)
class Ball:
    x: float
    y: float
    sx: float
    sy: float
    drift: tuple[float, float]  # mm of x, y per mm of z


@dataclass(frozen=True)
class Lesion:
    x: float
    y: float
    z: float
    radius: float
    hu: float
    solid: bool
    lobes: tuple[float, float, float, float]  # amplitudes and phases of 3- and 5-fold lobulation


@dataclass(frozen=True)
class Chest:
    body: tuple[Ball, ...]
    lungs: tuple[tuple[Ball, ...], tuple[Ball, ...]]
    heart: tuple[Ball, ...]
    spine: tuple[float, float]
    rib_radii: tuple[float, float]
    rib_z: tuple[float, ...]  # each rib's height at the back
    rib_drop: float  # how far (mm) a rib falls from the back to the front
    vessels: np.ndarray  # (curves, steps, 4): x, y, z, radius
    lesions: tuple[Lesion, ...]
    z_mid: float
    hu: Numbers


def write_site(folder: Path, site: HarborSite, *, options: WorldOptions, index: int) -> SiteRecord:
    require_empty(folder)
    rng = np.random.default_rng([options.seed, _WORLD_KEY, index])
    hu = Numbers(
        lung=rng.uniform(-900, -840),
        fat=rng.uniform(-105, -75),
        muscle=rng.uniform(45, 65),
        blood=rng.uniform(35, 55),
        cancellous=rng.uniform(150, 250),
        cortex=rng.uniform(1100, 1400),
    )
    patients = options.patient_count(site.patients)
    order = rng.permutation(patients)
    sick = set(order[: max(1, round(site.prevalence * patients))].tolist())
    if len(sick) == patients and patients >= 2:
        sick.discard(int(order[-1]))
    rows: list[tuple[str, str]] = []
    diameters: list[float] = []
    positive_patients = 0
    for p in range(patients):
        prng = np.random.default_rng([options.seed, _WORLD_KEY, index, 7, p])
        written, widest = _write_patient(folder, site, index, p, p in sick, hu, prng)
        rows += written
        diameters += widest
        positive_patients += any(label == "nodule" for _, label in written)
    write_labels_csv(folder, rows)
    record = SiteRecord(
        path=folder,
        layout="csv",
        matrix=MATRIX,
        fov_mm=site.fov_mm,
        slice_spacing_mm=site.spacing_mm,
        transfer_syntax=str(site.storage.transfer_syntax),
        patients=patients,
        positive_patients=positive_patients,
        slices=len(rows),
        positive_slices=sum(label == "nodule" for _, label in rows),
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
    site: HarborSite,
    index: int,
    p: int,
    sick: bool,
    hu: Numbers,
    rng: np.random.Generator,
) -> tuple[list[tuple[str, str]], list[float]]:
    z_top = float(rng.uniform(-60.0, 20.0))
    # head first: instance 1 is the top slice, z falls towards the feet
    zs = [z_top - k * site.spacing_mm for k in range(site.slices)]
    chest = _random_chest(rng, site=site, zs=zs, sick=sick, hu=hu)
    pixel = site.fov_mm / MATRIX
    corner = -site.fov_mm / 2 + pixel / 2
    key = f"{WORLD}|{index}|{p}"
    patient_id = f"HB{index}{p:05d}"
    study, series = make_uid(key, "st"), make_uid(key, "se")
    frame_ref = make_uid(key, "fr")
    series_number = 2 + index
    rows: list[tuple[str, str]] = []
    widest: dict[int, float] = {}
    for k, z in enumerate(zs):
        image, mask, cut = _render(chest, site=site, z=z, rng=rng)
        sop = make_uid(key, "im", k)
        rel = site.namer(p, study, series_number, k, sop)
        write_ct_slice(
            folder / rel,
            image,
            ids=SliceIds(
                patient_id=patient_id,
                patient_name=f"HARBOR^ANON^{index}{p:05d}",
                study_uid=study,
                series_uid=series,
                sop_uid=sop,
                frame_of_reference_uid=frame_ref,
                series_number=series_number,
                instance_number=k + 1,
                study_date=f"2022{3 + index:02d}{10 + p % 18:02d}",
                accession=f"H{index}{p:06d}",
            ),
            geometry=SliceGeometry((corner, corner, z), pixel, site.thickness_mm),
            scanner=site.scanner,
            storage=site.storage,
        )
        label = "nodule" if cut else "normal"
        rows.append((rel, label))
        if cut:
            write_mask(folder, sop, mask)
            for i, d in cut.items():
                widest[i] = max(widest.get(i, 0.0), d)
    return rows, [widest[i] for i in sorted(widest)]


def _random_chest(
    rng: np.random.Generator, *, site: HarborSite, zs: list[float], sick: bool, hu: Numbers
) -> Chest:
    w = rng.uniform(0.4, 0.46) * site.fov_mm  # body half-width
    d = w * rng.uniform(0.62, 0.72)
    ox, oy = rng.uniform(-5, 5), rng.uniform(-14, -4)

    def ball(x: float, y: float, sx: float, sy: float, drift: float = 0.15) -> Ball:
        return Ball(
            ox + x + rng.normal(0, 3),
            oy + y + rng.normal(0, 3),
            sx * rng.uniform(0.93, 1.07),
            sy * rng.uniform(0.93, 1.07),
            (float(rng.normal(0, drift)), float(rng.normal(0, drift))),
        )

    body = (
        ball(0, 0, 0.62 * w, 0.6 * d, 0.0),
        ball(-0.5 * w, 0.08 * d, 0.36 * w, 0.45 * d, 0.05),
        ball(0.5 * w, 0.08 * d, 0.36 * w, 0.45 * d, 0.05),
        ball(0, -0.42 * d, 0.45 * w, 0.32 * d, 0.05),
        ball(0, 0.45 * d, 0.55 * w, 0.3 * d, 0.0),
    )

    def lung(side: float) -> tuple[Ball, ...]:
        return (
            ball(side * 0.4 * w, -0.12 * d, 0.16 * w, 0.3 * d),
            ball(side * 0.45 * w, 0.22 * d, 0.15 * w, 0.26 * d),
            ball(side * 0.57 * w, 0.02 * d, 0.1 * w, 0.3 * d),
            ball(side * 0.28 * w, 0.3 * d, 0.1 * w, 0.18 * d),
        )

    lungs = (lung(-1.0), lung(1.0))
    heart = (
        ball(0.12 * w, -0.12 * d, 0.17 * w, 0.22 * d, 0.2),
        ball(0.2 * w, -0.25 * d, 0.12 * w, 0.14 * d, 0.2),
    )
    z_mid = (zs[0] + zs[-1]) / 2
    rib_z = tuple(float(v) for v in np.arange(zs[-1] - 20, zs[0] + 120, rng.uniform(17, 21)))
    vessels = _random_vessels(rng, lungs=lungs, zs=zs)
    lesions: list[Lesion] = []
    if sick:
        for _ in range(1 if rng.uniform() < 0.8 else 2):
            lobe = lungs[int(rng.integers(2))][int(rng.integers(3))]
            diameter = rng.uniform(5.0, 12.0)
            solid = bool(rng.uniform() < 0.65)
            lesions.append(
                Lesion(
                    lobe.x + rng.normal(0, 0.35) * lobe.sx,
                    lobe.y + rng.normal(0, 0.35) * lobe.sy,
                    rng.uniform(zs[-1], zs[0]),
                    diameter / 2,
                    rng.uniform(-10, 70) if solid else rng.uniform(-720, -480),
                    solid,
                    (
                        rng.uniform(0, 0.14),
                        rng.uniform(0, 2 * math.pi),
                        rng.uniform(0, 0.07),
                        rng.uniform(0, 2 * math.pi),
                    ),
                )
            )
    return Chest(
        body=body,
        lungs=lungs,
        heart=heart,
        spine=(ox, oy + 0.52 * d),
        rib_radii=(0.86 * w, 0.78 * d),
        rib_z=rib_z,
        rib_drop=rng.uniform(80, 110),
        vessels=vessels,
        lesions=tuple(lesions),
        z_mid=z_mid,
        hu=hu,
    )


def _random_vessels(
    rng: np.random.Generator, *, lungs: tuple[tuple[Ball, ...], ...], zs: list[float]
) -> np.ndarray:
    """Tortuous curves climbing through the lungs: (curves, steps, 4) of x, y, z, radius."""
    per_lung, steps = 110, 36
    curves = []
    for balls in lungs:
        for _ in range(per_lung):
            anchor = balls[int(rng.integers(len(balls)))]
            x = anchor.x + rng.normal(0, 0.6) * anchor.sx
            y = anchor.y + rng.normal(0, 0.6) * anchor.sy
            z = zs[-1] - rng.uniform(10, 30)
            velocity = rng.normal(0, 0.4, size=2)
            radius = float(np.clip(rng.lognormal(math.log(1.0), 0.45), 0.4, 3.0))
            points = []
            for _ in range(steps):
                points.append((x, y, z, radius))
                velocity = 0.8 * velocity + rng.normal(0, 0.35, size=2)
                x, y = x + velocity[0], y + velocity[1]
                z += rng.uniform(1.2, 2.4)
            curves.append(points)
    return np.asarray(curves, dtype=np.float32)


def _metaballs(balls: tuple[Ball, ...], xx: np.ndarray, yy: np.ndarray, dz: float) -> np.ndarray:
    field = np.zeros_like(xx)
    for b in balls:
        cx, cy = b.x + b.drift[0] * dz, b.y + b.drift[1] * dz
        field += np.exp(-0.5 * (((xx - cx) / b.sx) ** 2 + ((yy - cy) / b.sy) ** 2))
    return field


def _inside(field: np.ndarray, level: float, pixel: float) -> np.ndarray:
    """Soft coverage of ``field > level``, about one pixel wide at the contour."""
    gy, gx = np.gradient(field, pixel)
    slope = np.maximum(np.hypot(gx, gy), 1e-4)
    return np.clip(0.5 + (field - level) / (slope * 1.2 * pixel), 0, 1)


def _render(
    chest: Chest, *, site: HarborSite, z: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """(HU image, lesion mask, {lesion: labelled cross-section mm}) of the slice at ``z``."""
    pixel = site.fov_mm / MATRIX
    axis = (np.arange(MATRIX, dtype=np.float32) + 0.5) * pixel - site.fov_mm / 2
    xx, yy = np.meshgrid(axis, axis)
    hu = chest.hu
    dz = z - chest.z_mid
    img: np.ndarray = np.full((MATRIX, MATRIX), -1000.0, dtype=np.float32)

    body_field = _metaballs(chest.body, xx, yy, dz)
    body = _inside(body_field, 0.5, pixel)
    muscle = _inside(body_field, 0.78, pixel)
    img += body * (hu.fat - img)
    img += muscle * (hu.muscle - img)

    heart = _inside(_metaballs(chest.heart, xx, yy, dz), 0.5, pixel)
    lungs = (
        np.maximum(
            _inside(_metaballs(chest.lungs[0], xx, yy, dz), 0.45, pixel),
            _inside(_metaballs(chest.lungs[1], xx, yy, dz), 0.45, pixel),
        )
        * (1 - heart)
        * muscle
    )
    img += lungs * (hu.lung - img)
    img += heart * (hu.blood - img)
    sx, sy = chest.spine
    for ax, ay, r in ((sx + 14, sy - 26, 11.0), (sx + 6, -0.2 * sy - 10, 13.0)):
        img += np.clip(0.5 + (r - np.hypot(xx - ax, yy - ay)) / pixel, 0, 1) * (hu.blood - img)

    img += lungs * _vessel_layer(chest.vessels, z=z, xx=xx, pixel=pixel) * (hu.blood - hu.lung)
    _skeleton(img, chest, xx=xx, yy=yy, z=z, pixel=pixel, inside=muscle)

    mask = np.zeros(img.shape, dtype=bool)
    cut: dict[int, float] = {}
    for i, lesion in enumerate(chest.lesions):
        r2 = lesion.radius**2 - (z - lesion.z) ** 2
        if r2 <= 0:
            continue
        r = math.sqrt(r2)
        du, dv = xx - lesion.x, yy - lesion.y
        dist = np.hypot(du, dv)
        a3, p3, a5, p5 = lesion.lobes
        angle = np.arctan2(dv, du)
        if lesion.solid:
            edge = r * (1 + a3 * np.cos(3 * angle + p3) + a5 * np.cos(5 * angle + p5))
            inside = np.clip(0.5 + (edge - dist) / pixel, 0, 1)
            img += inside * (lesion.hu - img)
            shape = dist <= edge
        else:
            haze = np.exp(-0.5 * (dist / (0.6 * r)) ** 2)
            img += haze * np.maximum(lesion.hu - img, 0)
            shape = dist <= r
        if r >= LABEL_SHARE * lesion.radius and 2 * r >= MIN_LABEL_MM and shape.any():
            mask |= shape
            cut[i] = 2 * r

    img = cv2.GaussianBlur(img, (0, 0), site.psf_mm / pixel)
    img += _fbp_noise(rng, site=site)
    return img, mask, cut


def _vessel_layer(vessels: np.ndarray, *, z: float, xx: np.ndarray, pixel: float) -> np.ndarray:
    """Gaussian cross-sections (peak 1 for vessels wider than a pixel) where curves pierce z."""
    zc = vessels[:, :, 2]
    above = zc > z
    crossing = above.any(axis=1) & ~above[:, 0]
    curves = np.flatnonzero(crossing)
    k = np.argmax(above[curves], axis=1)  # first point above z
    p0, p1 = vessels[curves, k - 1], vessels[curves, k]
    t = ((z - p0[:, 2]) / np.maximum(p1[:, 2] - p0[:, 2], 1e-6))[:, None]
    points = p0 + t * (p1 - p0)
    n = xx.shape[0]
    origin = float(xx[0, 0])
    out = np.zeros_like(xx)
    for lo, hi in ((0.0, 0.8), (0.8, 1.4), (1.4, 2.2), (2.2, 9.0)):
        chosen = points[(points[:, 3] >= lo) & (points[:, 3] < hi)]
        if not len(chosen):
            continue
        sigma = max(float(chosen[:, 3].mean()) * 0.7, 0.3)
        impulses = np.zeros_like(xx)
        cols = (chosen[:, 0] - origin) / pixel
        rows = (chosen[:, 1] - origin) / pixel
        keep = (cols >= 0) & (cols < n - 1) & (rows >= 0) & (rows < n - 1)
        c0, r0 = cols[keep].astype(int), rows[keep].astype(int)
        fc, fr = cols[keep] - c0, rows[keep] - r0
        for dr, dc, weight in (
            (0, 0, (1 - fr) * (1 - fc)),
            (0, 1, (1 - fr) * fc),
            (1, 0, fr * (1 - fc)),
            (1, 1, fr * fc),
        ):
            np.add.at(impulses, (r0 + dr, c0 + dc), weight)
        s_px = sigma / pixel
        peak = min(1.0, (sigma / pixel) ** 2 * 1.5)  # thin vessels fade (partial volume)
        out += cv2.GaussianBlur(impulses, (0, 0), max(s_px, 0.35)) * (
            2 * math.pi * max(s_px, 0.35) ** 2 * peak * 0.9
        )
    return np.minimum(out, 1.0)


def _skeleton(
    img: np.ndarray,
    chest: Chest,
    *,
    xx: np.ndarray,
    yy: np.ndarray,
    z: float,
    pixel: float,
    inside: np.ndarray,
) -> None:
    hu = chest.hu
    sx, sy = chest.spine
    ring = np.hypot(xx - sx, (yy - sy) * 1.1)
    img += np.clip(0.5 + (17 - ring) / pixel, 0, 1) * (hu.cortex - img)
    img += np.clip(0.5 + (14 - ring) / pixel, 0, 1) * (hu.cancellous - img)
    for side in (-1.0, 1.0):  # transverse processes
        bar = np.hypot((xx - sx - side * 26) / 14, (yy - sy - 12) / 4.5)
        img += np.clip(0.5 + (1 - bar) * 4.5 / pixel, 0, 1) * (hu.cortex * 0.8 - img)
    # ribs: hoops that fall from the back to the front; a slice cuts each along an arc
    canvas = np.zeros(img.shape, dtype=np.uint8)
    theta = np.linspace(0.15, math.pi - 0.15, 160)  # from the side of the spine round the side
    ra, rb = chest.rib_radii
    origin = float(xx[0, 0])
    for side in (-1.0, 1.0):
        px = sx + side * ra * np.sin(theta)
        py = sy - 0.52 * rb + rb * np.cos(theta)
        for height in chest.rib_z:
            rib = height - chest.rib_drop * theta / math.pi
            hit = np.abs(rib - z) < 4.0
            for x, y in zip(px[hit], py[hit], strict=True):
                centre = (round((x - origin) / pixel * 16), round((y - origin) / pixel * 16))
                cv2.circle(canvas, centre, round(3.2 / pixel * 16), 255, -1, cv2.LINE_AA, 4)
    bone = canvas.astype(np.float32) / 255.0 * inside
    img += bone * (hu.cortex * 0.7 - img)


def _fbp_noise(rng: np.random.Generator, *, site: HarborSite) -> np.ndarray:
    """Noise with a ramp-times-Gaussian power spectrum, scaled to ``site.noise_hu``."""
    white = rng.standard_normal((MATRIX, MATRIX))
    fy = np.fft.fftfreq(MATRIX)[:, None]
    fx = np.fft.rfftfreq(MATRIX)[None, :]
    f = np.hypot(fx, fy)
    amplitude = np.sqrt(f * np.exp(-((f / site.cutoff) ** 2)))
    noise = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=(MATRIX, MATRIX))
    return (noise * (site.noise_hu / max(float(noise.std()), 1e-9))).astype(np.float32)
