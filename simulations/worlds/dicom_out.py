"""What the evaluation worlds write: CT slices as DICOM, lesion masks, labels, and a record of it.

This is the one module the worlds share. It knows nothing about anatomy: a world hands it HU
images, identities and geometry, and says how its scanner stores pixel values (signed or not,
rescale slope and intercept, bits stored, transfer syntax). It is this long because the worlds
may share nothing else (docs/worlds.md), so all they have in common, DICOM writing, masks, labels
and the record of what was written, is in this one module.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from fedct.common.errors import ConfigError

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
COMPRESSED = (RLELossless, JPEG2000Lossless)
MASKS = "masks"
# The CT number range every world's images are clipped to before storage (12-bit scanners).
HU_RANGE = (-1024.0, 3071.0)


@dataclass(frozen=True)
class WorldOptions:
    """How much of a world to write. Everything written is a pure function of ``seed``."""

    seed: int = 0
    scale: float = 1.0  # multiplies every hospital's number of patients
    sites: int | None = None  # write only the first N hospitals (tests)
    patients: int | None = None  # patients per hospital, overriding scale (tests)

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ConfigError(f"patient scale must be positive, got {self.scale}")
        if self.sites is not None and self.sites < 1:
            raise ConfigError(f"number of hospitals must be at least 1, got {self.sites}")
        if self.patients is not None and self.patients < 2:
            raise ConfigError(
                f"patients per hospital must be at least 2 (one of each class), got {self.patients}"
            )

    def patient_count(self, base: int) -> int:
        """Patients at a hospital whose full-size count is ``base``."""
        if self.patients is not None:
            return self.patients
        return max(2, round(base * self.scale))


@dataclass(frozen=True)
class SiteRecord:
    """What a world wrote for one hospital (for reports and tests; nothing of it is private)."""

    path: Path
    layout: Literal["folders", "csv"]
    matrix: int
    fov_mm: float
    slice_spacing_mm: float
    transfer_syntax: str
    patients: int
    positive_patients: int
    slices: int
    positive_slices: int
    # largest in-plane diameter of each lesion on the slices labelled as showing it
    lesion_diameters_mm: tuple[float, ...] = field(default=())

    @property
    def positive_fraction(self) -> float:
        return self.positive_slices / self.slices if self.slices else 0.0

    def lesion_px(self, grid: int = 96) -> tuple[float, ...]:
        """Lesion diameters in pixels of a ``grid``-px image of the whole field of view."""
        return tuple(d * grid / self.fov_mm for d in self.lesion_diameters_mm)


@dataclass(frozen=True)
class Storage:
    """How a scanner turns HU into stored pixel values, and how it packs them."""

    transfer_syntax: str = ExplicitVRLittleEndian
    signed: bool = False  # PixelRepresentation 1 (two's complement) or 0
    bits_stored: int = 16
    slope: float = 1.0
    intercept: float = -1024.0
    padding_hu: float | None = None  # HU written outside the reconstruction circle, declared
    # as PixelPaddingValue so readers can tell it from the patient

    def __post_init__(self) -> None:
        if UID(self.transfer_syntax) not in UNCOMPRESSED + COMPRESSED:
            names = ", ".join(UID(s).name for s in UNCOMPRESSED + COMPRESSED)
            raise ConfigError(
                f"transfer syntax {self.transfer_syntax} is not written by the worlds; "
                f"use one of: {names}"
            )
        if not 8 <= self.bits_stored <= 16:
            raise ConfigError(f"bits stored must be 8..16, got {self.bits_stored}")
        if self.slope <= 0:
            raise ConfigError(f"rescale slope must be positive, got {self.slope}")
        low, high = self.hu_limits
        if low > HU_RANGE[0] + 30 or high < 1000:
            raise ConfigError(
                f"storage with slope {self.slope}, intercept {self.intercept} and "
                f"{self.bits_stored} bits holds only {low:g}..{high:g} HU; it must hold air "
                "(-1000) to dense bone (1000): change the intercept or the bits stored"
            )

    @property
    def stored_limits(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1

    @property
    def hu_limits(self) -> tuple[float, float]:
        lo, hi = self.stored_limits
        return lo * self.slope + self.intercept, hi * self.slope + self.intercept

    def to_stored(self, hu: np.ndarray) -> np.ndarray:
        """Stored values (int16 or uint16) for ``hu``, clipped to what the storage can hold."""
        lo, hi = self.stored_limits
        values = np.rint((np.clip(hu, *HU_RANGE) - self.intercept) / self.slope)
        return np.clip(values, lo, hi).astype(np.int16 if self.signed else np.uint16)

    def padding_stored(self) -> int | None:
        if self.padding_hu is None:
            return None
        lo, hi = self.stored_limits
        return int(np.clip(round((self.padding_hu - self.intercept) / self.slope), lo, hi))


@dataclass(frozen=True)
class Scanner:
    """What a hospital's scanner writes into the header."""

    manufacturer: str
    model: str
    institution: str
    kernel: str
    kvp: float = 120.0
    station: str = "CT01"


@dataclass(frozen=True)
class SliceIds:
    """Identity of one slice; every name and ID is synthetic."""

    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    sop_uid: str
    frame_of_reference_uid: str
    series_number: int
    instance_number: int
    study_date: str = "20250301"  # YYYYMMDD
    accession: str = ""


@dataclass(frozen=True)
class SliceGeometry:
    """Where the slice sits: top-left pixel centre (mm), square pixel size, thickness."""

    origin_mm: tuple[float, float, float]
    pixel_mm: float
    thickness_mm: float


def make_uid(*parts: object) -> str:
    """A UID derived only from ``parts`` (same seed, same UIDs); parts are kept apart so
    ``("ab", "c")`` and ``("a", "bc")`` differ."""
    text = "\x1f".join(str(p) for p in ("fedct-worlds", *parts))
    return str(generate_uid(entropy_srcs=[text]))


def write_ct_slice(
    path: Path,
    hu: np.ndarray,
    *,
    ids: SliceIds,
    geometry: SliceGeometry,
    scanner: Scanner,
    storage: Storage,
    outside: np.ndarray | None = None,
) -> None:
    """Write the 2-D HU image ``hu`` as one CT Image Storage file at ``path``.

    ``outside`` (bool, same shape) marks pixels outside the reconstruction circle; they get the
    storage's padding value when it has one.
    """
    if hu.ndim != 2:
        raise ValueError(f"a CT slice is 2-D, got an array of shape {hu.shape}")
    stored = storage.to_stored(hu)
    padding = storage.padding_stored()
    if padding is not None and outside is not None:
        stored[outside] = padding
    syntax = UID(storage.transfer_syntax)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(ids.sop_uid)
    meta.TransferSyntaxUID = syntax if syntax in UNCOMPRESSED else ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ids.sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ids.study_date
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.AccessionNumber = ids.accession
    ds.Modality = "CT"
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model
    ds.InstitutionName = scanner.institution
    ds.StationName = scanner.station
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST CT (SYNTHETIC)"
    ds.SeriesDescription = "AXIAL"
    ds.ImageComments = "Synthetic evaluation-world phantom; no real patient"
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = f"{scanner.kvp:g}"
    ds.ConvolutionKernel = scanner.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = ids.study_uid
    ds.SeriesInstanceUID = ids.series_uid
    ds.FrameOfReferenceUID = ids.frame_of_reference_uid
    ds.StudyID = "1"
    ds.SeriesNumber = ids.series_number
    ds.InstanceNumber = ids.instance_number
    ds.ImagePositionPatient = [f"{v:.4f}" for v in geometry.origin_mm]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{geometry.origin_mm[2]:.4f}"
    ds.SliceThickness = f"{geometry.thickness_mm:g}"
    ds.PixelSpacing = [f"{geometry.pixel_mm:.6g}"] * 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = storage.bits_stored
    ds.HighBit = storage.bits_stored - 1
    ds.PixelRepresentation = 1 if storage.signed else 0
    ds.RescaleIntercept = f"{storage.intercept:g}"
    ds.RescaleSlope = f"{storage.slope:g}"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    if padding is not None:
        ds.PixelPaddingValue = padding
    if syntax in COMPRESSED:
        options = {"encoding_plugin": "pylibjpeg"} if syntax == JPEG2000Lossless else {}
        ds.compress(syntax, stored, generate_instance_uid=False, **options)  # type: ignore[arg-type]
    else:
        ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_mask(site: Path, sop_uid: str, mask: np.ndarray) -> Path:
    """Write a lesion mask as ``SITE/masks/<SOPInstanceUID>.png`` (uint8, 255 = lesion)."""
    folder = site / MASKS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sop_uid}.png"
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)
    return path


def write_labels_csv(site: Path, rows: Iterable[tuple[str, str]]) -> Path:
    """Write ``SITE/labels.csv`` with one ``path,label`` row per file."""
    path = site / "labels.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return path


def require_empty(site: Path) -> None:
    """Refuse to write into a hospital folder that already has files."""
    if site.exists() and any(site.iterdir()):
        raise ConfigError(
            f"{site} already exists and is not empty; choose another output folder "
            "or remove it first"
        )
