"""Read CT DICOM files into Hounsfield-unit frames, or say in one line why a file is unusable.

Reading is separate from preprocessing (as in MONAI): this module only decodes pixels (pydicom
plus the pylibjpeg plugins for JPEG, JPEG-LS, JPEG 2000 and RLE) and converts them to HU with
the rescale of each frame, handling CT Image Storage and (multi-frame) Enhanced CT.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from fedct.common.dicom_values import header_value

log = logging.getLogger(__name__)

# The CT number range of 12-bit scanners; values outside it are padding or reconstruction
# artefacts (e.g. -2048 / -3024 outside the scan field of view), so they are clipped.
HU_AIR = -1024.0
HU_MAX = 3071.0

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}


class UnusableFileError(Exception):
    """A single file cannot be used; ``reason`` is a one-line explanation for the site report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CTFrame:
    """One CT image (a slice, or one frame of an Enhanced CT object) in Hounsfield units."""

    hu: np.ndarray  # float32 (rows, cols), clipped to [HU_AIR, HU_MAX]
    sop_instance_uid: str
    frame: int  # 0-based frame number; 0 for single-frame objects
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    position: float | None  # mm along the slice normal, from ImagePositionPatient
    instance_number: int | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm
    slice_thickness: float | None
    manufacturer: str
    model: str
    hu_min: float  # before clipping, padding excluded
    hu_max: float


def read_ct_file(path: str | Path, data: bytes | None = None) -> list[CTFrame]:
    """Decode every frame of the CT file at ``path`` (or of its already-read bytes ``data``).

    Raises :class:`UnusableFileError` with a one-line reason for anything that is not a
    decodable grayscale CT image.
    """
    with warnings.catch_warnings():
        # pydicom's value-validation warnings quote header values verbatim, which can be
        # patient identifiers; they must not reach logs. Only these, only while reading.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
        return _read(io.BytesIO(data) if data is not None else str(path))


def _read(source: Any) -> list[CTFrame]:
    ds = _parse(source)
    _check_is_ct(ds)
    pixels = _decode(ds)
    n_frames = int(header_value(ds, "NumberOfFrames") or 1)
    if n_frames == 1 and pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.ndim != 3 or pixels.shape[0] != n_frames:
        raise UnusableFileError(
            f"unexpected pixel array shape {pixels.shape} for {n_frames} frame(s)"
        )

    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    padding = _padding_range(ds)
    frames = []
    for index in range(n_frames):
        groups = [g for g in (per_frame[index] if index < len(per_frame) else None, shared) if g]
        frames.append(_frame(ds, pixels[index], index, groups, padding))
    return frames


def _parse(source: Any) -> Dataset:
    try:
        try:
            return pydicom.dcmread(source)
        except InvalidDicomError:
            # Old ACR-NEMA style files have no 128-byte preamble; accept them only if, read
            # leniently, they look like an image (have SOP class and pixel data).
            if isinstance(source, io.BytesIO):
                source.seek(0)
            ds = pydicom.dcmread(source, force=True)
            if "SOPClassUID" not in ds or "PixelData" not in ds:
                raise UnusableFileError("not a DICOM file") from None
            return ds
    except UnusableFileError:
        raise
    except (EOFError, OSError, ValueError, KeyError, struct.error, TypeError) as err:
        raise UnusableFileError(f"not a readable DICOM file (truncated or corrupt: {err})") from err


def _check_is_ct(ds: Dataset) -> None:
    modality = str(header_value(ds, "Modality") or "")
    sop_class = str(header_value(ds, "SOPClassUID") or "")
    if modality != "CT" and sop_class not in CT_SOP_CLASSES:
        what = f"modality {modality}" if modality else "no modality"
        raise UnusableFileError(f"{what}, not CT")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise UnusableFileError("no pixel data (not an image, or the file is truncated)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise UnusableFileError("not a grayscale image (SamplesPerPixel > 1)")


def _decode(ds: Dataset) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    # A view on the file's bytes for uncompressed data (pydicom copies otherwise): the stored
    # values are only read, never written, on their way to HU. Not when Bits Stored < Bits
    # Allocated (most CT: 12 of 16): pydicom then copies anyway to clear and sign-extend the
    # unused high bits, which may hold overlays or other bits, and warns if a view was asked
    # for; correct_unused_bits=False would give a view, but of the uncorrected values.
    try:
        view_only = header_value(ds, "BitsStored") == header_value(ds, "BitsAllocated")
        if syntax:
            # pydicom's decoder API directly: Dataset.pixel_array adds a per-file overhead
            # (pydicom 3.0 annotates each keyword option as a whole DecodeOptions dict;
            # measured in docs/benchmarks.md, Ingestion)
            return get_decoder(syntax).as_array(ds, view_only=view_only)[0]
        ds.pixel_array_options(view_only=view_only)
        return ds.pixel_array
    except (NotImplementedError, RuntimeError) as err:
        name = getattr(syntax, "name", str(syntax))
        if (
            "plugin" in str(err).lower()
            or "decod" in str(err).lower()
            or "support" in str(err).lower()
        ):
            raise UnusableFileError(
                f"compressed as '{name}' and no installed decoder handles it "
                "(FedCT installs pylibjpeg, pylibjpeg-libjpeg, -openjpeg and -rle)"
            ) from err
        raise UnusableFileError(f"pixel data cannot be decoded ({name}): {err}") from err
    except (ValueError, EOFError, struct.error, AttributeError, KeyError, TypeError) as err:
        raise UnusableFileError(f"pixel data is truncated or corrupt: {err}") from err


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _lookup(ds: Dataset, groups: Sequence[Dataset], macro: str, keyword: str) -> Any:
    """A value from an Enhanced CT functional-group macro (per-frame first), else top level."""
    for group in groups:
        item = _first_item(group, macro)
        if item is not None and keyword in item:
            return header_value(item, keyword)
    return header_value(ds, keyword)


def _padding_range(ds: Dataset) -> tuple[float, float] | None:
    """The inclusive range of stored values that mark padding (outside the patient), if any."""
    if "PixelPaddingValue" not in ds:
        return None
    value = float(ds.PixelPaddingValue)
    limit = float(ds.get("PixelPaddingRangeLimit", value))
    return (min(value, limit), max(value, limit))


def _frame(
    ds: Dataset,
    stored: np.ndarray,
    index: int,
    groups: Sequence[Dataset],
    padding: tuple[float, float] | None,
) -> CTFrame:
    # pydicom.pixels.apply_modality_lut covers only the top-level rescale in float64; Enhanced
    # CT keeps it per frame in functional groups, and float32 is ample for HU and faster
    # (measured in docs/benchmarks.md, Ingestion).
    slope = float(_lookup(ds, groups, "PixelValueTransformationSequence", "RescaleSlope") or 1.0)
    intercept = float(
        _lookup(ds, groups, "PixelValueTransformationSequence", "RescaleIntercept") or 0.0
    )
    hu = stored.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    if padding is not None:
        valid = (stored < padding[0]) | (stored > padding[1])
        sample = hu[valid]
        hu_min = float(sample.min()) if sample.size else HU_AIR
        hu_max = float(sample.max()) if sample.size else HU_AIR
        hu[~valid] = HU_AIR
    else:
        # one cv2 pass instead of numpy's min() then max(): faster (docs/benchmarks.md)
        hu_min, hu_max, _, _ = cv2.minMaxLoc(hu) if hu.size else (HU_AIR, HU_AIR, None, None)
    if hu_min < HU_AIR or hu_max > HU_MAX:
        np.clip(hu, HU_AIR, HU_MAX, out=hu)

    spacing = _lookup(ds, groups, "PixelMeasuresSequence", "PixelSpacing")
    thickness = _lookup(ds, groups, "PixelMeasuresSequence", "SliceThickness")
    ipp = _lookup(ds, groups, "PlanePositionSequence", "ImagePositionPatient")
    iop = _lookup(ds, groups, "PlaneOrientationSequence", "ImageOrientationPatient")
    instance = header_value(ds, "InstanceNumber")
    return CTFrame(
        hu=hu,
        sop_instance_uid=str(header_value(ds, "SOPInstanceUID") or ""),
        frame=index,
        series_instance_uid=str(header_value(ds, "SeriesInstanceUID") or ""),
        study_instance_uid=str(header_value(ds, "StudyInstanceUID") or ""),
        patient_id=str(header_value(ds, "PatientID") or ""),
        position=_position_along_normal(ipp, iop),
        instance_number=int(instance) if instance not in (None, "") else None,
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        manufacturer=str(header_value(ds, "Manufacturer") or ""),
        model=str(header_value(ds, "ManufacturerModelName") or ""),
        hu_min=hu_min,
        hu_max=hu_max,
    )


def _position_along_normal(ipp: Any, iop: Any) -> float | None:
    """Slice position in mm along the normal of the image plane (the usual slice ordering key)."""
    if not ipp or len(ipp) != 3:
        return None
    x, y, z = (float(v) for v in ipp)
    if iop and len(iop) == 6:
        # row x column direction cosines in plain floats (numpy costs more than the sums here)
        r1, r2, r3, c1, c2, c3 = (float(v) for v in iop)
        n1, n2, n3 = r2 * c3 - r3 * c2, r3 * c1 - r1 * c3, r1 * c2 - r2 * c1
        if n1 or n2 or n3:
            return x * n1 + y * n2 + z * n3
    return z
