"""header_value must give exactly what pydicom's own conversion gives, only faster."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from fedct.common.dicom_values import header_value

KEYWORDS = [
    "Modality", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
    "PatientID", "PatientName", "Manufacturer", "ManufacturerModelName", "InstanceNumber",
    "NumberOfFrames", "RescaleSlope", "RescaleIntercept", "PixelSpacing", "SliceThickness",
    "ImagePositionPatient", "ImageOrientationPatient", "SamplesPerPixel", "ImageType",
    "WindowCenter", "WindowWidth", "StudyID", "AccessionNumber", "BodyPartExamined",
]  # fmt: skip
DATA = Path(pydicom.data.__file__).parent
FILES = sorted((DATA / "test_files").glob("*.dcm")) + sorted((DATA / "charset_files").glob("*.dcm"))


def _read(data: bytes) -> Dataset | None:
    try:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:
        return None


def _pydicom_value(data: bytes, keyword: str) -> object:
    ds = _read(data)
    assert ds is not None
    try:
        return ("value", ds.get(keyword))
    except Exception as err:
        return ("error", type(err))


def _ours(data: bytes, keyword: str) -> object:
    ds = _read(data)
    assert ds is not None
    try:
        return ("value", header_value(ds, keyword))
    except Exception as err:
        return ("error", type(err))


def _both_nan(a: object, b: object) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


def _same(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword in KEYWORDS:
            theirs, ours = _pydicom_value(data, keyword), _ours(data, keyword)
            assert ours == theirs or _both_nan(ours[1], theirs[1]), keyword
            # pydicom's str/float/int subclasses (UID, DSfloat, IS) and MultiValue for lists
            kind = MultiValue if type(ours[1]) is list else type(ours[1])
            assert isinstance(theirs[1], kind), keyword


def test_every_bundled_file_gives_pydicoms_values() -> None:
    assert len(FILES) > 80
    checked = 0
    for path in FILES:
        data = path.read_bytes()
        if _read(data) is None:
            continue
        _same(data)
        checked += 1
    assert checked > 70


def _file(transfer_syntax: str, **values: object) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4\x00"[:-1]
    ds.Modality = "CT"
    for key, value in values.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=transfer_syntax == ImplicitVRLittleEndian,
               little_endian=transfer_syntax != ExplicitVRBigEndian)  # fmt: skip
    return buffer.getvalue()


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_edge_values_match_pydicom(syntax: str) -> None:
    _same(
        _file(
            syntax,
            PixelSpacing=[" 0.5", "0.75 "],  # padded, several values
            ImagePositionPatient=["-1.5e2", "0", "+12.25"],
            RescaleSlope="1",
            RescaleIntercept="",  # empty DS
            InstanceNumber="12.0",  # not a strict IS: pydicom decides
            SliceThickness="nan",  # not finite: pydicom decides
            ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],  # several CS values
            Manufacturer="Siemens  ",
            ManufacturerModelName="",
            PatientID="\\".join(["A", "B"]),  # two values: pydicom's MultiValue
        )
    )


def test_non_ascii_and_escapes_are_left_to_pydicom() -> None:
    data = _file(
        ExplicitVRLittleEndian,
        SpecificCharacterSet="ISO_IR 100",
        Manufacturer="Sjöberg Medical",
        PatientID="Müller-7",
    )
    _same(data)
    ds = _read(data)
    assert ds is not None
    assert header_value(ds, "Manufacturer") == "Sjöberg Medical"
    # ISO 2022: Japanese text is written as 7-bit bytes between escape sequences
    data = _file(
        ExplicitVRLittleEndian,
        SpecificCharacterSet=["", "ISO 2022 IR 87"],
        Manufacturer="山田医療",
    )
    assert b"\x1b$B" in data
    _same(data)
    ds = _read(data)
    assert ds is not None
    assert header_value(ds, "Manufacturer") == "山田医療"


def test_values_already_converted_come_from_pydicom() -> None:
    ds = _read(_file(ExplicitVRLittleEndian, RescaleIntercept="-1024"))
    assert ds is not None
    assert ds.RescaleIntercept == -1024  # converted by pydicom now
    assert header_value(ds, "RescaleIntercept") == -1024
    assert header_value(ds, "WindowCenter", "none") == "none"
    with pytest.raises(KeyError, match="not a DICOM keyword"):
        header_value(ds, "Windowcentre")
