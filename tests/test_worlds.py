"""The independent evaluation worlds: FedCT reads every file, layouts, labels, lesion sizes,
storage, HU calibration, determinism, and independence from FedCT's own generator."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from fedct.common.cli import main
from fedct.common.dicom_io import read_ct_file
from fedct.common.errors import ConfigError
from fedct.common.labels import LABELS_FILE, MASKS_DIR
from fedct.common.preprocess import GridConfig
from fedct.common.site import SiteData, load_site
from fedct.simulations.worlds import (
    WORLDS,
    SiteRecord,
    WorldOptions,
    build_world,
    harbor,
    meadow,
    ward,
    write_world,
)

GRID = GridConfig(image_size=96)
WORLD_DIR = Path(__file__).resolve().parents[1] / "simulations" / "worlds"
PATIENTS = {"meadow": 6, "ward": 6, "harbor": 6}  # per hospital: tiny, but both classes
POSITIVE_FRACTION = {"meadow": (0.2, 0.42), "ward": (0.25, 0.55), "harbor": (0.06, 0.22)}
# equivalent diameter of each labelled lesion cross-section: mm, and px on a 96 px grid of the FOV
LESION_MM = {"meadow": (3.5, 24.5), "ward": (2.5, 31.5), "harbor": (2.5, 12.5)}
LESION_PX = {"meadow": (0.8, 8.2), "ward": (0.6, 8.5), "harbor": (0.6, 3.8)}


class World:
    def __init__(self, name: str, records: list[SiteRecord]) -> None:
        self.name = name
        self.records = records
        self.sites = [load_site(r.path, grid=GRID, progress=False) for r in records]


@pytest.fixture(scope="module", params=sorted(WORLDS))
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    name = request.param
    out = tmp_path_factory.mktemp(name)
    return World(name, build_world(name, out, WorldOptions(seed=0, patients=PATIENTS[name])))


def _files(site: Path) -> list[str]:
    return sorted(
        p.relative_to(site).as_posix()
        for p in site.rglob("*")
        if p.is_file() and p.parts[len(site.parts)] != MASKS_DIR and p.name != LABELS_FILE
    )


def test_registry_names_roles_and_errors(tmp_path: Path) -> None:
    assert set(WORLDS) == {"meadow", "ward", "harbor"}
    assert WORLDS["meadow"].role == "tuning"
    assert {WORLDS["ward"].role, WORLDS["harbor"].role} == {"held-out"}
    assert all(spec.hospitals == 3 for spec in WORLDS.values())
    with pytest.raises(ConfigError, match=r"known worlds: harbor, meadow, ward"):
        write_world("atlantis", tmp_path)
    with pytest.raises(ConfigError, match="at most 3"):
        build_world("ward", tmp_path, WorldOptions(sites=4))
    with pytest.raises(ConfigError, match="scale"):
        WorldOptions(scale=0)
    assert WorldOptions(scale=0.5).patient_count(30) == 15
    assert WorldOptions(scale=0.5, patients=3).patient_count(30) == 3


def test_fedct_reads_every_file_with_both_classes(world: World) -> None:
    spec = WORLDS[world.name]
    assert len(world.sites) == spec.hospitals
    for record, site in zip(world.records, world.sites, strict=True):
        assert site.skipped == [], site.skipped
        assert site.problems == []
        assert site.mode == spec.layout == record.layout
        assert len(site.slices) == len(_files(record.path)) == record.slices
        assert site.labels == ["nodule", "normal"]
        assert sum(s.label == "nodule" for s in site.slices) == record.positive_slices
        assert len({s.patient_key for s in site.slices}) == record.patients
        site.require_trainable(["normal", "nodule"])


def test_layout_is_the_documented_one(world: World) -> None:
    patterns = {
        "meadow": r"(normal|nodule)/p\d{3}_s\d{2}\.dcm",
        "ward": r"(normal|nodule)/W\d-\d{4}/IMG\d{4}\.dcm",
        "harbor": r"(DICOM/S\d{4}/SE\d{4}/IM\d{5}|IMAGES/[\d.]+|PACS/[0-9A-F]{8}/\d+/\d{8})",
    }
    for record in world.records:
        files = _files(record.path)
        assert all(re.fullmatch(patterns[world.name], f) for f in files), files[:3]
        top = {p.name for p in record.path.iterdir() if p.is_file()}
        if world.name == "harbor":
            assert top == {LABELS_FILE}
            assert all(Path(f).suffix == "" or Path(f).parent.name == "IMAGES" for f in files)
            assert all(f.count("/") >= 1 for f in files)
        else:
            assert top == set()  # class folders only: nothing outside them
    if world.name == "harbor":  # three different PACS naming styles
        firsts = {_files(r.path)[0].split("/", 1)[0] for r in world.records}
        assert firsts == {"DICOM", "IMAGES", "PACS"}


def test_positive_fraction_and_non_iid_prevalence(world: World) -> None:
    slices = sum(r.slices for r in world.records)
    positives = sum(r.positive_slices for r in world.records)
    low, high = POSITIVE_FRACTION[world.name]
    assert low <= positives / slices <= high
    module = {"meadow": meadow, "ward": ward, "harbor": harbor}[world.name]
    prevalences = [s.prevalence for s in module.SITES]
    assert len(set(prevalences)) == len(prevalences)  # sites differ on purpose


def _lesion_sizes(site: SiteData) -> list[tuple[float, float]]:
    """(mm, px on the 96 px grid) of every lesion cross-section in the site's masks."""
    sizes = []
    for i, s in enumerate(site.slices):
        path = site.root / MASKS_DIR / f"{s.meta.sop_instance_uid}.png"
        assert path.is_file() == (s.label == "nodule"), s.path
        if not path.is_file():
            continue
        with Image.open(path) as image:
            mask = np.asarray(image)
        assert mask.dtype == np.uint8
        assert mask.shape == (s.meta.rows, s.meta.cols)
        assert site.lesion_mask(i) is not None
        spacing = s.meta.pixel_spacing[0] if s.meta.pixel_spacing else 1.0
        fov = spacing * max(s.meta.rows, s.meta.cols)
        count, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8))
        for area in stats[1:count, cv2.CC_STAT_AREA]:
            mm = 2 * np.sqrt(area * spacing**2 / np.pi)
            sizes.append((mm, mm * GRID.image_size / fov))
    return sizes


def test_lesion_masks_and_sizes(world: World) -> None:
    sizes = [size for site in world.sites for size in _lesion_sizes(site)]
    assert sizes
    mm = np.array([s[0] for s in sizes])
    px = np.array([s[1] for s in sizes])
    low, high = LESION_MM[world.name]
    assert low <= mm.min()
    assert mm.max() <= high
    low, high = LESION_PX[world.name]
    assert low <= px.min()
    assert px.max() <= high
    if world.name == "harbor":
        assert (px <= 3.0).mean() > 0.5  # small lesions, as on real chest CT
    else:  # clearly visible: a world where nothing learns ranks no recipe
        assert np.median(px) >= 3.0
        assert px.max() >= 6.0
    recorded = np.array([d for r in world.records for d in r.lesion_px()])
    assert len(recorded)
    assert recorded.max() <= LESION_PX[world.name][1]


def test_storage_and_compression(world: World) -> None:
    module = {"meadow": meadow, "ward": ward, "harbor": harbor}[world.name]
    seen = []
    for record, spec in zip(world.records, module.SITES, strict=True):
        ds = pydicom.dcmread(record.path / _files(record.path)[0])
        syntax = ds.file_meta.TransferSyntaxUID
        assert syntax == spec.storage.transfer_syntax == record.transfer_syntax
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert int(ds.PixelRepresentation) == int(spec.storage.signed)
        assert float(ds.RescaleSlope) == spec.storage.slope
        assert float(ds.RescaleIntercept) == spec.storage.intercept
        assert int(ds.BitsStored) == spec.storage.bits_stored
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for keyword in ("ImagePositionPatient", "SliceLocation", "PixelSpacing", "SliceThickness"):
            assert keyword in ds
        if syntax in (RLELossless, JPEG2000Lossless):
            assert syntax.is_compressed
            # really compressed: the stored bytes are not the raw pixel buffer
            assert len(ds.PixelData) != ds.Rows * ds.Columns * 2
        seen.append(
            (syntax, int(ds.PixelRepresentation), float(ds.RescaleSlope), ds.RescaleIntercept)
        )
    syntaxes = [s[0] for s in seen]
    if world.name in ("meadow", "ward"):
        assert syntaxes.count(RLELossless) == 1
    else:
        assert (JPEG2000Lossless, 1, 1.0, 0) in seen  # JPEG 2000 lossless, signed
        assert any(s[1] == 0 and s[3] == -1024 for s in seen)  # unsigned, intercept -1024
        assert any(s[2] != 1.0 for s in seen)  # a rescale slope other than 1


SOFT_TISSUE, FAT, LUNG = (-30.0, 150.0), (-150.0, -50.0), (-960.0, -600.0)


def _median(hu: np.ndarray, window: tuple[float, float]) -> float:
    return float(np.median(hu[(hu > window[0]) & (hu < window[1])]))


def test_hu_calibration_after_fedct_reader(world: World) -> None:
    for record in world.records:
        for rel in _files(record.path)[:3]:
            hu = read_ct_file(record.path / rel)[0].hu
            corner = hu[:6, :6]
            assert -1025 <= float(np.median(corner)) <= -950  # air
            assert 15 <= _median(hu, SOFT_TISSUE) <= 75  # muscle, unenhanced blood
            assert -125 <= _median(hu, FAT) <= -60
            assert -920 <= _median(hu, LUNG) <= -760
            assert hu.max() > 300  # bone


def test_same_seed_same_bytes_other_seed_other_pixels(tmp_path: Path) -> None:
    for name in sorted(WORLDS):
        runs = {}
        for tag, seed in (("a", 5), ("b", 5), ("c", 6)):
            records = build_world(
                name, tmp_path / tag / name, WorldOptions(seed=seed, sites=1, patients=2)
            )
            runs[tag] = records[0].path
        files = _files(runs["a"])
        assert files == _files(runs["b"])
        for rel in files:
            assert (runs["a"] / rel).read_bytes() == (runs["b"] / rel).read_bytes()
        other = _files(runs["c"])
        first = read_ct_file(runs["a"] / files[0])[0].hu
        second = read_ct_file(runs["c"] / other[0])[0].hu
        assert first.shape != second.shape or not np.array_equal(first, second)


def _imported_modules(path: Path) -> set[str]:
    package = "fedct.simulations.worlds"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_worlds_share_no_code_with_fedct_generator() -> None:
    forbidden = (
        "fedct.simulations.phantom",
        "fedct.simulations.synth",
        "fedct.simulations.dicom_writer",
    )
    sources = sorted(WORLD_DIR.glob("*.py"))
    assert {p.stem for p in sources} >= {"__init__", "dicom_out", "meadow", "ward", "harbor"}
    for path in sources:
        imported = _imported_modules(path)
        bad = [m for m in imported if m.startswith(forbidden) or m in ("phantom", "synth")]
        assert not bad, f"{path.name} imports {bad}"
        if path.stem in ("meadow", "ward", "harbor"):  # nor with each other, beyond dicom_out
            ours = {m for m in imported if m.startswith("fedct.simulations")}
            assert ours, f"{path.name} uses nothing of dicom_out?"
            assert all(m.startswith("fedct.simulations.worlds.dicom_out") for m in ours), ours


def test_fedct_reads_a_real_ct_slice_in_the_worlds_hu_range(world: World) -> None:
    path = get_testdata_file("CT_small.dcm")  # a real 128x128 CT slice, bundled with pydicom
    assert isinstance(path, str)
    real = read_ct_file(path)[0].hu
    assert real.shape == (128, 128)
    assert -1024 <= real.min() < -700
    assert 300 < real.max() < 3071
    for record in world.records:
        hu = read_ct_file(record.path / _files(record.path)[0])[0].hu
        assert abs(_median(hu, SOFT_TISSUE) - _median(real, SOFT_TISSUE)) < 30
        assert abs(_median(hu, FAT) - _median(real, FAT)) < 30


def test_cli_writes_a_world(tmp_path: Path) -> None:
    out = tmp_path / "ward"
    args = ["data", "synth", "--world", "ward", "--sites", "1", "--scale", "0.1", "--out", str(out)]
    assert main(args) == 0
    assert [p.name for p in out.iterdir()] == ["ward-1"]
    patients = {p.name for p in (out / "ward-1").glob("*/W1-*")}
    assert len(patients) == round(ward.SITES[0].patients * 0.1)
    assert main(args) == 1  # not empty: refused, not overwritten
    assert main(["data", "synth", "--world", "atlantis", "--out", str(tmp_path / "x")]) == 1
