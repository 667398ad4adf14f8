"""A procedural chest CT phantom: one patient's anatomy, sampled slice by slice.

Every structure has a plausible CT number and size: air, subcutaneous fat, muscle/soft tissue,
aerated lung (about -850 HU) with vessels running cranio-caudally, mediastinum and heart,
aorta, vertebral body with cortex, ribs, the patient table. Nodules are spheres (solid or
ground-glass, 4-30 mm) whose cross-section is averaged over the slice thickness, so a nodule
smaller than a slice fades in and out as it would on a real scanner. On a single slice a small
nodule looks much like a vessel seen end-on: that, the noise and the blur are what keep the
task from being trivial.

It is this long because it is one anatomy model: kept in one file so its CT numbers, shapes and
drawing helpers stay together.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

AIR, FAT, SOFT, BLOOD, LUNG = -1000.0, -100.0, 40.0, 45.0, -850.0
CANCELLOUS, CORTICAL, TABLE = 250.0, 900.0, 150.0


@dataclass(frozen=True)
class Nodule:
    center_mm: tuple[float, float, float]  # x (patient left +), y (posterior +), z
    diameter_mm: float
    hu: float  # solid ~ -50..80, ground glass ~ -650..-350


@dataclass(frozen=True)
class LesionMix:
    """Which nodules a population has: the share of ground-glass ones (the rest solid) and the
    range of diameters (log-uniform). Screening programmes see many small and ground-glass
    nodules, oncology referrals large solid ones, and public collections mostly what
    radiologists marked with confidence."""

    ground_glass: float = 0.25
    diameter_mm: tuple[float, float] = (4.0, 30.0)
    # share of patients (with or without a nodule) with 1-3 calcified granulomas: healed,
    # benign, far brighter than any nodule, common where histoplasmosis or tuberculosis is
    # (a slice showing only granulomas is labelled normal)
    calcified: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.diameter_mm
        shares = (self.ground_glass, self.calcified)
        if not all(0.0 <= x <= 1.0 for x in shares) or not 0 < low <= high:
            raise ValueError(f"invalid lesion mix {self}")


@dataclass(frozen=True)
class Vessel:
    x0: float  # position at z = 0 (mm)
    y0: float
    dx: float  # drift per mm of z
    dy: float
    radius_mm: float


@dataclass(frozen=True)
class Anatomy:
    body_a: float  # body half-width (mm)
    body_b: float  # body half-depth (mm)
    fat_mm: float
    lung_a: float
    lung_b: float
    lung_gap: float  # mediastinum half-width
    heart_r: float
    vessels: tuple[Vessel, ...]
    nodules: tuple[Nodule, ...]
    z_range: tuple[float, float]  # slab covered by the series
    texture_seed: int = 0
    granulomas: tuple[Nodule, ...] = ()  # calcified, benign: drawn, never in the lesion mask


def random_anatomy(
    rng: np.random.Generator,
    *,
    z_range: tuple[float, float],
    nodules: int,
    lesions: LesionMix | None = None,
    slice_z: tuple[float, ...] = (),
) -> Anatomy:
    """A random chest; with ``lesions.calcified``, granulomas centred on some of ``slice_z``
    (the exported slices: a sparse export would otherwise rarely show a small one)."""
    body_a = rng.uniform(140, 185)
    body_b = body_a * rng.uniform(0.62, 0.75)
    lung_a, lung_b = body_a * rng.uniform(0.32, 0.36), body_b * rng.uniform(0.58, 0.66)
    gap = body_a * rng.uniform(0.09, 0.12)
    vessels = []
    for _ in range(int(rng.integers(60, 90))):
        side = rng.choice([-1.0, 1.0])
        # vessels are denser and thicker near the hilum, thinner in the periphery
        rho = np.sqrt(rng.uniform(0, 1))
        theta = rng.uniform(0, 2 * np.pi)
        cx = side * (gap + lung_a)
        x = cx + rho * lung_a * 0.9 * np.cos(theta)
        y = rho * lung_b * 0.9 * np.sin(theta)
        radius = float(np.clip(rng.lognormal(np.log(0.8), 0.35) * (1.3 - 0.6 * rho), 0.3, 2.0))
        vessels.append(Vessel(x, y, rng.normal(0, 0.25), rng.normal(0, 0.25), radius))
    found = tuple(
        _random_nodule(
            rng,
            side=float(rng.choice([-1.0, 1.0])),
            lung_a=lung_a,
            lung_b=lung_b,
            gap=gap,
            z_range=z_range,
            lesions=lesions or LesionMix(),
        )
        for _ in range(nodules)
    )
    return Anatomy(
        body_a,
        body_b,
        rng.uniform(8, 25),
        lung_a,
        lung_b,
        gap,
        body_a * rng.uniform(0.22, 0.28),
        tuple(vessels),
        found,
        z_range,
        int(rng.integers(2**31)),
        _granulomas(rng, lesions or LesionMix(), lung_a, lung_b, gap, slice_z),
    )


def _granulomas(
    rng: np.random.Generator,
    lesions: LesionMix,
    lung_a: float,
    lung_b: float,
    gap: float,
    slice_z: tuple[float, ...],
) -> tuple[Nodule, ...]:
    if lesions.calcified <= 0 or not slice_z or rng.uniform() >= lesions.calcified:
        return ()
    found = []
    for _ in range(int(rng.integers(1, 4))):
        diameter = float(rng.uniform(5.0, 12.0))
        side = float(rng.choice([-1.0, 1.0]))
        rho = np.sqrt(rng.uniform(0, 1)) * 0.75
        theta = rng.uniform(0, 2 * np.pi)
        x = side * (gap + lung_a) + rho * lung_a * np.cos(theta)
        y = rho * lung_b * np.sin(theta)
        z = float(rng.choice(slice_z)) + rng.uniform(-1.0, 1.0)
        found.append(Nodule((float(x), float(y), z), diameter, float(rng.uniform(400, 1000))))
    return tuple(found)


def _random_nodule(
    rng: np.random.Generator,
    *,
    side: float,
    lung_a: float,
    lung_b: float,
    gap: float,
    z_range: tuple[float, float],
    lesions: LesionMix,
) -> Nodule:
    # Log-uniform diameter: many small nodules (hard), fewer large ones (easy).
    low, high = lesions.diameter_mm
    diameter = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    rho = np.sqrt(rng.uniform(0, 1)) * (1 - diameter / 2 / min(lung_a, lung_b)) * 0.85
    theta = rng.uniform(0, 2 * np.pi)
    x = side * (gap + lung_a) + rho * lung_a * np.cos(theta)
    y = rho * lung_b * np.sin(theta)
    margin = min(diameter / 2, (z_range[1] - z_range[0]) / 4)
    z = rng.uniform(z_range[0] + margin, z_range[1] - margin)
    ground_glass = rng.uniform() < lesions.ground_glass
    hu = rng.uniform(-650, -350) if ground_glass else rng.uniform(-60, 80)
    return Nodule((float(x), float(y), float(z)), diameter, float(hu))


def nodule_radius_in_slice(nodule: Nodule, z: float, thickness: float) -> tuple[float, float]:
    """(apparent radius in mm, fraction of the slice thickness the nodule fills) at ``z``.

    The slice integrates over ``thickness``: the visible radius is the largest cross-section in
    the slab and the contrast is scaled by the share of the slab the sphere occupies there.
    """
    r = nodule.diameter_mm / 2
    dz = abs(z - nodule.center_mm[2])
    lo, hi = dz - thickness / 2, dz + thickness / 2
    if lo >= r:
        return 0.0, 0.0
    nearest = max(lo, 0.0) if hi > 0 else 0.0
    radius = float(np.sqrt(max(r * r - nearest * nearest, 0.0)))
    covered = min(hi, r) - max(lo, -r)
    fill = float(np.clip(covered / thickness, 0.0, 1.0))
    return radius, fill


def render_slice(
    anatomy: Anatomy, *, z: float, matrix: int, pixel_mm: float, thickness: float
) -> tuple[np.ndarray, np.ndarray]:
    """(HU image, lesion mask) of the slice at ``z`` before scanner blur and noise."""
    half = matrix * pixel_mm / 2
    coords = (np.arange(matrix, dtype=np.float32) + 0.5) * pixel_mm - half
    xx, yy = np.meshgrid(coords, coords)
    image = np.full((matrix, matrix), AIR, dtype=np.float32)
    a = anatomy
    # the chest narrows towards the apex: scale the lungs with position in the slab
    t = (z - a.z_range[0]) / max(a.z_range[1] - a.z_range[0], 1.0)
    lung_scale = 0.85 + 0.15 * np.sin(np.pi * (0.3 + 0.6 * t))
    soft_edge = max(pixel_mm * 0.7, 0.5)

    _paint_ellipse(image, xx, yy, 0, a.body_b + 28, a.body_a * 1.2, 6, TABLE, soft_edge)
    _paint_ellipse(image, xx, yy, 0, 0, a.body_a, a.body_b, FAT, soft_edge)
    _paint_ellipse(image, xx, yy, 0, 0, a.body_a - a.fat_mm, a.body_b - a.fat_mm, SOFT, soft_edge)
    for k in range(7):  # ribs: small bone ellipses along the chest wall, moving with z
        angle = np.pi * (0.12 + 0.76 * k / 6) + 0.02 * z
        for side in (-1.0, 1.0):
            rx = side * (a.body_a - a.fat_mm - 5) * np.cos(angle - np.pi / 2) * 0.98
            ry = -(a.body_b - a.fat_mm - 5) * np.sin(angle - np.pi / 2) * 0.98
            _paint_ellipse(image, xx, yy, rx, -ry, 6, 4, CORTICAL * 0.8, soft_edge)

    lung_a, lung_b = a.lung_a * lung_scale, a.lung_b * lung_scale
    lungs = np.zeros_like(image, dtype=bool)
    for side in (-1.0, 1.0):
        d = _ellipse(xx, yy, side * (a.lung_gap + a.lung_a), -a.body_b * 0.05, lung_a, lung_b)
        _paint(image, d, LUNG, soft_edge)
        lungs |= d < 0
    _paint_ellipse(
        image,
        xx,
        yy,
        a.lung_gap * 0.4,
        -a.body_b * 0.25,
        a.heart_r,
        a.heart_r * 0.85,
        BLOOD,
        soft_edge,
    )
    _paint_ellipse(image, xx, yy, -a.lung_gap * 0.2, a.body_b * 0.35, 13, 13, BLOOD, soft_edge)
    spine_y = a.body_b * 0.62
    _paint_ellipse(image, xx, yy, 0, spine_y, 19, 16, CORTICAL, soft_edge)
    _paint_ellipse(image, xx, yy, 0, spine_y, 16, 13, CANCELLOUS, soft_edge)
    _paint_ellipse(image, xx, yy, 0, spine_y + 22, 7, 7, SOFT, soft_edge)
    lung_texture = cv2.GaussianBlur(
        np.random.default_rng([a.texture_seed, round(z * 100) % 2**31])
        .normal(0, 25, image.shape)
        .astype(np.float32),
        (0, 0),
        6.0 / pixel_mm,
    )
    image[lungs] += lung_texture[lungs]
    vessel_layer = np.zeros_like(image)
    for v in a.vessels:
        _add_disk(
            vessel_layer,
            xx,
            yy,
            v.x0 + v.dx * z,
            v.y0 + v.dy * z,
            v.radius_mm,
            BLOOD - LUNG,
            soft_edge,
        )
    image[lungs] += vessel_layer[lungs]

    mask = np.zeros_like(image, dtype=bool)
    for granuloma in a.granulomas:  # drawn like a nodule, never in the lesion mask
        drawn = _lesion_layer(granuloma, image, xx, yy, z, thickness, soft_edge)
        if drawn is not None:
            image[lungs] += drawn[0][lungs]
    for nodule in a.nodules:
        drawn = _lesion_layer(nodule, image, xx, yy, z, thickness, soft_edge)
        if drawn is None:
            continue
        layer, radius = drawn
        image[lungs] = (
            np.maximum(image[lungs], LUNG + layer[lungs])
            if nodule.hu < -300
            else (image[lungs] + layer[lungs] * 0.9)
        )
        mask |= _ellipse(xx, yy, nodule.center_mm[0], nodule.center_mm[1], radius, radius) < 0
    return image, mask & lungs


def _lesion_layer(
    lesion: Nodule,
    like: np.ndarray,
    xx: np.ndarray,
    yy: np.ndarray,
    z: float,
    thickness: float,
    soft_edge: float,
) -> tuple[np.ndarray, float] | None:
    """The lesion's disk in the slice at ``z`` (HU above lung) and its radius; None when the
    slice misses it."""
    radius, fill = nodule_radius_in_slice(lesion, z, thickness)
    if radius <= 0:
        return None
    layer = np.zeros_like(like)
    x, y, _ = lesion.center_mm
    _add_disk(layer, xx, yy, x, y, radius, (lesion.hu - LUNG) * fill, soft_edge)
    return layer, radius


def scan(
    image: np.ndarray, rng: np.random.Generator, *, pixel_mm: float, blur_mm: float, noise_hu: float
) -> np.ndarray:
    """The scanner: reconstruction blur, then correlated quantum noise."""
    out = cv2.GaussianBlur(image, (0, 0), max(blur_mm / pixel_mm, 0.3))
    white = rng.normal(0, 1, image.shape).astype(np.float32)
    noise = cv2.GaussianBlur(white, (0, 0), 0.7)
    return out + noise * np.float32(noise_hu / max(float(noise.std()), 1e-6))


def _ellipse(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float
) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse: negative inside."""
    r = np.sqrt(((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2)
    return (r - 1.0) * min(a, b)


def _paint(image: np.ndarray, distance: np.ndarray, value: float, edge: float) -> None:
    alpha = np.clip(0.5 - distance / (2 * edge), 0.0, 1.0)
    image += alpha * (value - image)


def _paint_ellipse(
    image: np.ndarray,
    xx: np.ndarray,
    yy: np.ndarray,
    cx: float,
    cy: float,
    a: float,
    b: float,
    value: float,
    edge: float,
) -> None:
    """Paint a soft-edged ellipse, computing only inside its bounding box."""
    box = _box(xx, cx, cy, max(a, b) + 2 * edge, image.shape)
    if box is not None:
        rows, cols = box
        _paint(
            image[rows, cols], _ellipse(xx[rows, cols], yy[rows, cols], cx, cy, a, b), value, edge
        )


def _box(
    xx: np.ndarray, cx: float, cy: float, reach: float, shape: tuple[int, ...]
) -> tuple[slice, slice] | None:
    step = float(xx[0, 1] - xx[0, 0])
    origin = float(xx[0, 0])
    reach += step
    c0 = max(int((cx - reach - origin) / step), 0)
    c1 = min(int((cx + reach - origin) / step) + 2, shape[1])
    r0 = max(int((cy - reach - origin) / step), 0)
    r1 = min(int((cy + reach - origin) / step) + 2, shape[0])
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


def _add_disk(
    layer: np.ndarray,
    xx: np.ndarray,
    yy: np.ndarray,
    cx: float,
    cy: float,
    radius: float,
    value: float,
    edge: float,
) -> None:
    """Add a soft-edged disk within its bounding box only (vessels are many and small)."""
    box = _box(xx, cx, cy, radius + 2 * edge, layer.shape)
    if box is None:
        return
    rows, cols = box
    d = np.sqrt((xx[rows, cols] - cx) ** 2 + (yy[rows, cols] - cy) ** 2) - radius
    layer[rows, cols] += np.clip(0.5 - d / (2 * edge), 0.0, 1.0) * value
