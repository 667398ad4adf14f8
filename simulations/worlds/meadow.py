"""World "meadow" (the tuning world): three hospitals in Keras-style class folders.

Anatomy: a superellipse torso with a fat layer, two rotated-ellipse lungs whose posterior
(dependent) part is denser, a 3-D vessel tree of straight segments per lung that branches from
the hilum and thins towards the pleura (clipped to each slice's slab, so oblique vessels show as
streaks and cranio-caudal ones as dots), heart and aorta, the spine and ribs as Gaussian bright
blobs, and a curved sandwich table under the patient. CT numbers are drawn per scanner. Noise is
white Gaussian noise shaped by the scanner's small kernel (smooth, sharp or blotchy) at a per-site
level.

Nodules are 6-24 mm across, large enough to tell from vessels on a 96 px grid (a tuning world on
which nothing learns cannot tell recipes apart). Labels are per slice: a slice is in ``nodule/``
when its central plane cuts a nodule at least 4 mm across, else in ``normal/`` (with the other
slices of the same patient).

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
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

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

WORLD = "meadow"
_WORLD_KEY = 0x6D656164  # the random streams of this world, apart from every other world's
MIN_LABEL_DIAMETER_MM = 4.0
NODULE_MM = (6.0, 24.0)  # diameter, log-uniform


@dataclass(frozen=True)
class MeadowSite:
    name: str
    scanner: Scanner
    storage: Storage
    matrix: int
    fov_mm: float
    slices: int
    spacing_mm: float
    thickness_mm: float
    blur_mm: float
    noise_hu: float
    noise_kernel: tuple[tuple[float, ...], ...]
    patients: int
    prevalence: float  # share of patients with nodules


_SMOOTH = ((1, 2, 1), (2, 4, 2), (1, 2, 1))
_SHARP = ((0, -1, 0), (-1, 6, -1), (0, -1, 0))
_BLOTCHY = ((1, 1, 1, 1, 1),) * 5

SITES: tuple[MeadowSite, ...] = (
    MeadowSite(
        "meadow-north",
        Scanner("Meadow Imaging", "MX-64 (synthetic)", "Meadow North Clinic", "SOFT-B", 120.0),
        Storage(ExplicitVRLittleEndian, signed=False, bits_stored=12, intercept=-1024.0),
        matrix=256,
        fov_mm=380.0,
        slices=9,
        spacing_mm=2.5,
        thickness_mm=2.5,
        blur_mm=1.1,
        noise_hu=14.0,
        noise_kernel=_SMOOTH,
        patients=30,
        prevalence=0.42,
    ),
    MeadowSite(
        "meadow-east",
        Scanner("Ostwald", "Helios 16 (synthetic)", "Meadow East Hospital", "LUNG-SHARP", 130.0),
        Storage(RLELossless, signed=True, bits_stored=16, intercept=0.0),
        matrix=200,
        fov_mm=330.0,
        slices=10,
        spacing_mm=2.6,
        thickness_mm=2.0,
        blur_mm=0.7,
        noise_hu=24.0,
        noise_kernel=_SHARP,
        patients=24,
        prevalence=0.6,
    ),
    MeadowSite(
        "meadow-south",
        Scanner("Meadow Imaging", "MX-8 (synthetic)", "Meadow South Infirmary", "STD", 110.0),
        Storage(ExplicitVRLittleEndian, signed=False, bits_stored=16, intercept=-1000.0),
        matrix=160,
        fov_mm=305.0,
        slices=8,
        spacing_mm=3.0,
        thickness_mm=4.0,
        blur_mm=1.6,
        noise_hu=30.0,
        noise_kernel=_BLOTCHY,
        patients=34,
        prevalence=0.55,
    ),
)


@dataclass(frozen=True)
class Tissues:
    """CT numbers (HU) of one scanner's calibration."""

    lung: float
    dependent: float  # extra HU at the posterior edge of the lungs
    fat: float
    soft: float
    blood: float
    vessel: float  # lung vessels: a little below solid nodules
    bone: float
    table: float


@dataclass(frozen=True)
class Segment:
    start: tuple[float, float, float]  # mm (x, y, z)
    end: tuple[float, float, float]
    radius: float


@dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float
    hu: float
    ground_glass: bool


@dataclass(frozen=True)
class Lung:
    cx: float
    cy: float
    a: float
    b: float
    angle: float  # radians


@dataclass(frozen=True)
class Body:
    cx: float
    cy: float
    a: float
    b: float
    power: float
    fat: float
    lungs: tuple[Lung, Lung]
    heart: tuple[float, float, float, float]  # cx, cy, a, b
    aorta: tuple[float, float, float]  # cx, cy, r
    spine: tuple[float, float]  # cx, cy
    rib_phase: float
    rib_tilt: float  # radians of rib-angle change per mm of z
    vessels: tuple[Segment, ...]
    nodules: tuple[Sphere, ...]
    tissues: Tissues


def write_site(folder: Path, site: MeadowSite, *, options: WorldOptions, index: int) -> SiteRecord:
    require_empty(folder)
    rng = np.random.default_rng([options.seed, _WORLD_KEY, index])
    tissues = Tissues(
        lung=rng.uniform(-880, -830),
        dependent=rng.uniform(30, 80),
        fat=rng.uniform(-115, -85),
        soft=rng.uniform(35, 55),
        blood=rng.uniform(38, 50),
        vessel=rng.uniform(0, 20),
        bone=rng.uniform(650, 950),
        table=rng.uniform(150, 300),
    )
    patients = options.patient_count(site.patients)
    positive = np.zeros(patients, dtype=bool)
    positive[rng.permutation(patients)[: max(1, round(patients * site.prevalence))]] = True
    if patients >= 2 and positive.all():
        positive[int(rng.integers(patients))] = False  # both classes at every site
    slices = positives = 0
    diameters: list[float] = []
    positive_patients = 0
    for p in range(patients):
        prng = np.random.default_rng([options.seed, _WORLD_KEY, index, p + 1])
        shown = _write_patient(folder, site, index, p, bool(positive[p]), tissues, prng)
        slices += site.slices
        positives += shown.positive_slices
        diameters += shown.diameters
        positive_patients += bool(shown.positive_slices)
    record = SiteRecord(
        path=folder,
        layout="folders",
        matrix=site.matrix,
        fov_mm=site.fov_mm,
        slice_spacing_mm=site.spacing_mm,
        transfer_syntax=str(site.storage.transfer_syntax),
        patients=patients,
        positive_patients=positive_patients,
        slices=slices,
        positive_slices=positives,
        lesion_diameters_mm=tuple(diameters),
    )
    log.info(
        "%s: %d patients, %d slices, %.0f%% showing a nodule",
        site.name,
        patients,
        slices,
        100 * record.positive_fraction,
    )
    return record


@dataclass(frozen=True)
class _Shown:
    positive_slices: int
    diameters: list[float]


def _write_patient(
    folder: Path,
    site: MeadowSite,
    index: int,
    p: int,
    positive: bool,
    tissues: Tissues,
    rng: np.random.Generator,
) -> _Shown:
    z0 = float(rng.uniform(-240.0, -160.0))
    zs = [z0 + k * site.spacing_mm for k in range(site.slices)]
    body = _random_body(rng, site=site, zs=zs, positive=positive, tissues=tissues)
    pixel = site.fov_mm / site.matrix
    origin = -site.fov_mm / 2 + pixel / 2
    patient_id = f"MDW{index}{p:03d}"
    study = make_uid(WORLD, patient_id, "study")
    series = make_uid(WORLD, patient_id, "series")
    frame_ref = make_uid(WORLD, patient_id, "frame")
    largest: dict[int, float] = {}
    shown = 0
    for k, z in enumerate(zs):
        hu, mask, cut = _render(body, site=site, z=z, rng=rng)
        sop = make_uid(WORLD, patient_id, "slice", k)
        label = "nodule" if cut else "normal"
        write_ct_slice(
            folder / label / f"p{p:03d}_s{k:02d}.dcm",
            hu,
            ids=SliceIds(
                patient_id=patient_id,
                patient_name=f"MEADOW^SYNTHETIC{index}{p:03d}",
                study_uid=study,
                series_uid=series,
                sop_uid=sop,
                frame_of_reference_uid=frame_ref,
                series_number=3,
                instance_number=k + 1,
                study_date=f"2024{1 + p % 12:02d}{1 + p % 27:02d}",
            ),
            geometry=SliceGeometry((origin, origin, z), pixel, site.thickness_mm),
            scanner=site.scanner,
            storage=site.storage,
        )
        if cut:
            shown += 1
            write_mask(folder, sop, mask)
            for n, diameter in cut.items():
                largest[n] = max(largest.get(n, 0.0), diameter)
    return _Shown(shown, [largest[n] for n in sorted(largest)])


def _random_body(
    rng: np.random.Generator,
    *,
    site: MeadowSite,
    zs: list[float],
    positive: bool,
    tissues: Tissues,
) -> Body:
    half = site.fov_mm / 2
    a = half * rng.uniform(0.74, 0.88)
    b = a * rng.uniform(0.6, 0.7)
    cx, cy = rng.uniform(-8, 8), -0.07 * half + rng.uniform(-5, 5)
    lung_a, lung_b = a * rng.uniform(0.3, 0.35), b * rng.uniform(0.6, 0.68)
    offset = a * rng.uniform(0.44, 0.5)
    tilt = rng.uniform(0.08, 0.25)
    lungs = (
        Lung(cx - offset, cy - 0.04 * b, lung_a, lung_b, tilt),
        Lung(cx + offset * rng.uniform(0.95, 1.05), cy - 0.04 * b, lung_a * 0.95, lung_b, -tilt),
    )
    jitter = rng.normal(0, 8, size=6)
    shifted = Tissues(
        lung=tissues.lung + jitter[0],
        dependent=tissues.dependent,
        fat=tissues.fat + jitter[1],
        soft=tissues.soft + jitter[2] / 2,
        blood=tissues.blood + jitter[3] / 2,
        vessel=tissues.vessel + jitter[3] / 2,
        bone=tissues.bone + 10 * jitter[4],
        table=tissues.table,
    )
    z_mid = (zs[0] + zs[-1]) / 2
    vessels: list[Segment] = []
    for lung, side in zip(lungs, (-1.0, 1.0), strict=True):
        hilum = (lung.cx - side * lung.a * 0.55, lung.cy + lung.b * 0.05, z_mid)
        for trunk in range(5):
            direction = np.array([side * 0.6, rng.normal(0, 0.5), (trunk - 2) * 0.7])
            _grow(
                rng,
                vessels,
                lung=lung,
                start=np.array(hilum),
                direction=direction,
                radius=rng.uniform(2.8, 3.8),  # hilar trunks: 5.6-7.6 mm
                length=rng.uniform(12, 18),
                depth=0,
            )
        # the tree's far twigs (1-3 mm): short, mostly cranio-caudal, sparser near the pleura
        for _ in range(40):
            rho, theta = 0.85 * rng.uniform() ** 0.8, rng.uniform(0, 2 * math.pi)
            x, y = _in_lung(lung, rho * math.cos(theta), rho * math.sin(theta))
            z = rng.uniform(zs[0] - 12, zs[-1] + 12)
            step = np.array([rng.normal(0, 0.5), rng.normal(0, 0.5), 1.0])
            step *= rng.uniform(6, 16) / float(np.linalg.norm(step))
            radius = float(np.clip(rng.lognormal(math.log(0.7), 0.3), 0.5, 1.5))
            vessels.append(Segment((x, y, z), (x + step[0], y + step[1], z + step[2]), radius))
    nodules: list[Sphere] = []
    if positive:
        for _ in range(1 if rng.uniform() < 0.4 else 2):
            nodules.append(_random_nodule(rng, lungs=lungs, zs=zs, spacing=site.spacing_mm))
    return Body(
        cx=cx,
        cy=cy,
        a=a,
        b=b,
        power=rng.uniform(2.3, 3.0),
        fat=rng.uniform(6, 22),
        lungs=lungs,
        heart=(cx + a * 0.1, cy - b * 0.28, a * 0.22, b * 0.3),
        aorta=(cx - a * 0.06, cy + b * 0.2, rng.uniform(10, 14)),
        spine=(cx, cy + b * 0.66),
        rib_phase=rng.uniform(0, 0.3),
        rib_tilt=rng.uniform(0.004, 0.01),
        vessels=tuple(vessels),
        nodules=tuple(nodules),
        tissues=shifted,
    )


def _grow(
    rng: np.random.Generator,
    out: list[Segment],
    *,
    lung: Lung,
    start: np.ndarray,
    direction: np.ndarray,
    radius: float,
    length: float,
    depth: int,
) -> None:
    """One segment and its children: they thin by about a third a generation, and branch less
    (then not at all) as they near the pleura, down to 1 mm vessels."""
    unit = direction / max(float(np.linalg.norm(direction)), 1e-6)
    end = start + unit * length
    x0, y0, z0 = (float(v) for v in start)
    x1, y1, z1 = (float(v) for v in end)
    out.append(Segment((x0, y0, z0), (x1, y1, z1), radius))
    rho = _lung_radius(lung, x1, y1)
    if depth >= 5 or radius < 0.75 or rho > 0.9:
        return
    for _ in range(2 if rho < 0.65 else 1):
        _grow(
            rng,
            out,
            lung=lung,
            start=end,
            direction=unit + rng.normal(0, 0.55, size=3),
            radius=max(radius * rng.uniform(0.6, 0.72), 0.5),
            length=length * rng.uniform(0.7, 0.9),
            depth=depth + 1,
        )


def _random_nodule(
    rng: np.random.Generator, *, lungs: tuple[Lung, Lung], zs: list[float], spacing: float
) -> Sphere:
    diameter = math.exp(rng.uniform(*np.log(NODULE_MM)))
    radius = diameter / 2
    lung = lungs[int(rng.integers(2))]
    reach = max(0.8 - radius / min(lung.a, lung.b), 0.1)
    rho, theta = reach * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
    x, y = _in_lung(lung, rho * math.cos(theta), rho * math.sin(theta))
    # centred near one slice, so every nodule is cut close to its widest
    z = zs[int(rng.integers(len(zs)))] + rng.uniform(-spacing / 4, spacing / 4)
    ground_glass = bool(rng.uniform() < 0.3)
    hu = rng.uniform(-650, -400) if ground_glass else rng.uniform(25, 65)
    return Sphere((x, y, z), radius, hu, ground_glass)


def _in_lung(lung: Lung, u: float, v: float) -> tuple[float, float]:
    """The point at unit-ellipse coordinates (u, v) of ``lung`` (|(u, v)| < 1 is inside)."""
    c, s = math.cos(lung.angle), math.sin(lung.angle)
    x, y = u * lung.a, v * lung.b
    return lung.cx + c * x - s * y, lung.cy + s * x + c * y


def _lung_radius(lung: Lung, x: float, y: float) -> float:
    """The unit-ellipse radius of point (x, y) in ``lung`` (< 1 inside, 1 on the pleura)."""
    c, s = math.cos(lung.angle), math.sin(lung.angle)
    dx, dy = x - lung.cx, y - lung.cy
    return math.hypot((c * dx + s * dy) / lung.a, (-s * dx + c * dy) / lung.b)


def _render(
    body: Body, *, site: MeadowSite, z: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """(HU image, lesion mask, {nodule: diameter mm} of the nodules labelled on this slice)."""
    n = site.matrix
    pixel = site.fov_mm / n
    coords = (np.arange(n, dtype=np.float32) + 0.5) * pixel - site.fov_mm / 2
    xx, yy = np.meshgrid(coords, coords)
    t = body.tissues
    edge = 0.8 * pixel
    img: np.ndarray = np.full((n, n), -1000.0, dtype=np.float32)

    # curved carbon-fibre table: two thin shells around a foam core
    top = body.cy + body.b + 5 - 0.0015 * (xx - body.cx) ** 2
    across = np.abs(xx - body.cx) < body.a * 1.2
    for start, stop, value in ((0.0, 2.5, t.table), (2.5, 9.0, -850.0), (9.0, 11.5, t.table)):
        img[across & (yy >= top + start) & (yy < top + stop)] = value

    outer = _superellipse(xx, yy, body.cx, body.cy, body.a, body.b, body.power)
    inner = _superellipse(
        xx, yy, body.cx, body.cy, body.a - body.fat, body.b - body.fat * 0.8, body.power
    )
    _blend(img, _soft(outer, min(body.a, body.b), edge), t.fat)
    _blend(img, _soft(inner, min(body.a, body.b), edge), t.soft)

    lung_alpha = np.zeros_like(img)
    for lung in body.lungs:
        g = _rotated_ellipse(xx, yy, lung)
        lung_alpha = np.maximum(lung_alpha, _soft(g, min(lung.a, lung.b), edge))
    gravity = np.clip((yy - body.cy + body.b * 0.6) / (body.b * 1.2), 0, 1) ** 2
    _blend(img, lung_alpha, 0.0)
    img += lung_alpha * (t.lung + t.dependent * gravity)

    hx, hy, ha, hb = body.heart
    _blend(img, _soft(np.hypot((xx - hx) / ha, (yy - hy) / hb), min(ha, hb), edge), t.blood)
    ax, ay, ar = body.aorta
    _blend(img, _soft(np.hypot(xx - ax, yy - ay) / ar, ar, edge), t.blood)

    vessels = _vessel_layer(body.vessels, z=z, thickness=site.thickness_mm, n=n, pixel=pixel)
    img += vessels * (t.vessel - img) * lung_alpha

    bone = np.zeros_like(img)
    sx, sy = body.spine
    bone += np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / (2 * 11.0**2))
    bone += 0.7 * np.exp(-((xx - sx) ** 2 + (yy - sy - 24) ** 2) / (2 * 5.0**2))
    for k in range(6):
        for side in (-1.0, 1.0):
            angle = body.rib_phase + 0.35 + 0.42 * k + body.rib_tilt * z
            rx = body.cx + side * (body.a - body.fat - 6) * math.sin(angle) * 0.97
            ry = body.cy - (body.b - body.fat * 0.8 - 6) * math.cos(angle) * 0.97
            bone += 0.8 * np.exp(-((xx - rx) ** 2 + (yy - ry) ** 2) / (2 * 3.6**2))
    img += np.minimum(bone, 1.0) * (t.bone - t.soft)

    mask = np.zeros((n, n), dtype=bool)
    cut: dict[int, float] = {}
    half = site.thickness_mm / 2
    for i, nod in enumerate(body.nodules):
        nx, ny, nz = nod.center
        if abs(z - nz) > nod.radius + half:
            continue
        # partial volume: the slab's three sub-planes, averaged
        coverage = np.zeros_like(img)
        d = np.hypot(xx - nx, yy - ny)
        soft_edge = 1.6 if nod.ground_glass else edge
        for dz in (-half * 2 / 3, 0.0, half * 2 / 3):
            r2 = nod.radius**2 - (z + dz - nz) ** 2
            if r2 > 0:
                coverage += np.clip(0.5 - (d - math.sqrt(r2)) / (2 * soft_edge), 0, 1) / 3
        coverage *= lung_alpha
        if nod.ground_glass:
            img = np.maximum(img, img + coverage * (nod.hu - img))
        else:
            _blend(img, coverage, nod.hu)
        r2 = nod.radius**2 - (z - nz) ** 2
        if r2 > 0 and 2 * math.sqrt(r2) >= MIN_LABEL_DIAMETER_MM:
            disk = d <= math.sqrt(r2)
            if disk.any():
                mask |= disk
                cut[i] = 2 * math.sqrt(r2)

    img = np.asarray(cv2.GaussianBlur(img, (0, 0), max(site.blur_mm / pixel, 0.35)), np.float32)
    kernel = np.asarray(site.noise_kernel, dtype=np.float32)
    noise = cv2.filter2D(rng.standard_normal((n, n), dtype=np.float32), -1, kernel)
    img += noise * np.float32(site.noise_hu / float(np.sqrt((kernel**2).sum())))
    return img, mask, cut


def _superellipse(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, power: float
) -> np.ndarray:
    """Superellipse 'radius': < 1 inside."""
    return (np.abs((xx - cx) / a) ** power + np.abs((yy - cy) / b) ** power) ** (1 / power)


def _rotated_ellipse(xx: np.ndarray, yy: np.ndarray, lung: Lung) -> np.ndarray:
    c, s = math.cos(lung.angle), math.sin(lung.angle)
    dx, dy = xx - lung.cx, yy - lung.cy
    return np.hypot((c * dx + s * dy) / lung.a, (-s * dx + c * dy) / lung.b)


def _soft(radius: np.ndarray, size: float, edge: float) -> np.ndarray:
    """Coverage (0..1) of a shape given its normalised radius (1 on the boundary)."""
    return np.clip(0.5 + (1 - radius) * size / (2 * edge), 0, 1).astype(np.float32)


def _blend(img: np.ndarray, alpha: np.ndarray, value: float) -> None:
    img += alpha * (value - img)


def _vessel_layer(
    segments: tuple[Segment, ...], *, z: float, thickness: float, n: int, pixel: float
) -> np.ndarray:
    """Coverage (0..1) of the vessels inside the slab ``z ± thickness/2``."""
    canvas = np.zeros((n, n), dtype=np.uint8)
    lo, hi = z - thickness / 2, z + thickness / 2
    scale = 16  # cv2's sub-pixel shift of 4 bits
    for seg in segments:
        (x0, y0, z0), (x1, y1, z1) = seg.start, seg.end
        if min(z0, z1) - seg.radius > hi or max(z0, z1) + seg.radius < lo:
            continue
        if abs(z1 - z0) < 1e-6:
            t0, t1 = 0.0, 1.0
        else:
            ta, tb = (lo - seg.radius - z0) / (z1 - z0), (hi + seg.radius - z0) / (z1 - z0)
            t0, t1 = max(min(ta, tb), 0.0), min(max(ta, tb), 1.0)
            if t0 > t1:
                continue
        points = []
        for t in (t0, t1):
            col = (x0 + t * (x1 - x0) + (n * pixel) / 2) / pixel - 0.5
            row = (y0 + t * (y1 - y0) + (n * pixel) / 2) / pixel - 0.5
            points.append((round(col * scale), round(row * scale)))
        width = max(1, round(2 * seg.radius / pixel))
        # vessels thinner than a pixel are drawn one pixel wide at their partial-volume share
        strength = min(1.0, 2 * seg.radius / pixel) * 0.9
        cv2.line(canvas, points[0], points[1], round(255 * strength), width, cv2.LINE_AA, 4)
    return canvas.astype(np.float32) / np.float32(255.0)
