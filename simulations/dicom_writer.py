"""Write HU images as valid CT Image Storage DICOM files (synthetic data and test fixtures)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

# Our own UID root (pydicom's, which it allots to generated UIDs) keeps every synthetic UID
# recognisable and valid.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class Scanner:
    """What a scanner writes into the header, and how it stores pixel values."""

    manufacturer: str = "FedCT"
    model: str = "Synthetic CT"
    rescale_intercept: float = -1024.0
    rescale_slope: float = 1.0
    signed: bool = False  # PixelRepresentation 1 (int16) or 0 (uint16)
    padding_hu: float | None = None  # HU marking pixels outside the reconstruction circle
    transfer_syntax: str = ExplicitVRLittleEndian
    kvp: float = 120.0
    kernel: str = "STANDARD"


@dataclass(frozen=True)
class SliceHeader:
    """Per-slice identity and geometry; every name and ID here is synthetic."""

    patient_name: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    instance_number: int
    position_mm: tuple[float, float, float]
    pixel_spacing_mm: float
    slice_thickness_mm: float
    study_date: dt.date = dt.date(2026, 1, 1)
    institution: str = "Synthetic Hospital"


def new_uid(entropy: str) -> str:
    """A deterministic UID derived from ``entropy`` (same seed, same UIDs)."""
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[entropy]))


def write_ct_slice(path: Path, hu: np.ndarray, header: SliceHeader, scanner: Scanner) -> None:
    """Write ``hu`` (2-D, Hounsfield units) as one CT Image Storage file at ``path``."""
    stored = _to_stored(hu, scanner)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(header.sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = header.sop_uid
    date = header.study_date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model
    ds.InstitutionName = header.institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST (SYNTHETIC PHANTOM)"
    ds.SeriesDescription = "AXIAL LUNG"
    ds.ImageComments = "Synthetic phantom written by FedCT; no real patient"
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{header.slice_thickness_mm:g}"
    ds.KVP = f"{scanner.kvp:g}"
    ds.ConvolutionKernel = scanner.kernel
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.InstanceNumber = header.instance_number
    ds.ImagePositionPatient = [f"{v:.3f}" for v in header.position_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = new_uid(header.series_uid + "/frame-of-reference")
    ds.SliceLocation = f"{header.position_mm[2]:.3f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [f"{header.pixel_spacing_mm:.6f}"] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if scanner.signed else 0
    ds.RescaleIntercept = f"{scanner.rescale_intercept:g}"
    ds.RescaleSlope = f"{scanner.rescale_slope:g}"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    if scanner.padding_hu is not None:
        ds.PixelPaddingValue = int(_hu_to_stored(scanner.padding_hu, scanner))
    ds.PixelData = stored.tobytes()
    if UID(scanner.transfer_syntax) != ExplicitVRLittleEndian:
        ds.compress(scanner.transfer_syntax, stored, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _hu_to_stored(hu: np.ndarray | float, scanner: Scanner) -> np.ndarray:
    return np.rint(
        (np.asarray(hu, dtype=np.float64) - scanner.rescale_intercept) / scanner.rescale_slope
    )


def _to_stored(hu: np.ndarray, scanner: Scanner) -> np.ndarray:
    dtype = np.int16 if scanner.signed else np.uint16
    info = np.iinfo(dtype)
    return np.clip(_hu_to_stored(hu, scanner), info.min, info.max).astype(dtype)
