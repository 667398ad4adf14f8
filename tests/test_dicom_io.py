from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML

from fedct.common.dicom_io import HU_AIR, UnusableFileError, read_ct_file


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return Path(str(path))


@pytest.mark.parametrize(
    "name", ["693_UNCR.dcm", "693_J2KR.dcm", "eCT_Supplemental.dcm", "explicit_VR-UN.dcm"]
)
def test_real_ct_hu_is_physically_plausible(name: str) -> None:
    for frame in read_ct_file(pydicom_file(name)):
        hu = frame.hu
        assert hu.dtype == np.float32
        assert hu.min() >= HU_AIR
        assert np.mean(hu < -900) > 0.3, "air around the patient should be near -1000 HU"
        assert np.mean((hu >= -100) & (hu <= 150)) > 0.05, "soft tissue should be near 0-100 HU"
        assert frame.pixel_spacing is not None
        assert 0.1 < frame.pixel_spacing[0] < 2


def test_ct_small_soft_tissue_centered_near_water() -> None:
    (frame,) = read_ct_file(pydicom_file("CT_small.dcm"))
    assert -50 < float(np.median(frame.hu)) < 100
    assert frame.manufacturer == "GE MEDICAL SYSTEMS"


def test_jpeg2000_and_uncompressed_decode_identically() -> None:
    (j2k,) = read_ct_file(pydicom_file("693_J2KR.dcm"))
    (raw,) = read_ct_file(pydicom_file("693_UNCR.dcm"))
    np.testing.assert_array_equal(j2k.hu, raw.hu)


def test_jpeg_lossless_decodes() -> None:
    (frame,) = read_ct_file(pydicom_file("bad_sequence.dcm"))
    assert frame.hu.shape == (512, 512)
    assert frame.hu.max() > 200  # bone


def test_enhanced_ct_frames_have_their_own_geometry() -> None:
    frames = read_ct_file(pydicom_file("eCT_Supplemental.dcm"))
    assert [f.frame for f in frames] == [0, 1]
    assert frames[0].position != frames[1].position
    assert frames[0].pixel_spacing == pytest.approx((0.388672, 0.388672))
    assert len({f.sop_instance_uid for f in frames}) == 1


def test_pixel_padding_becomes_air(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    arr = ds.pixel_array.copy()
    arr[:10, :10] = -2000
    ds.PixelData = arr.tobytes()
    ds.PixelPaddingValue = -2000
    ds.save_as(tmp_path / "pad.dcm")
    (frame,) = read_ct_file(tmp_path / "pad.dcm")
    assert np.all(frame.hu[:10, :10] == HU_AIR)
    assert frame.hu_min > -1100  # padding excluded from the reported range


def test_random_bytes_are_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "noise.dcm"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(UnusableFileError, match="not a"):
        read_ct_file(path)


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    data = pydicom_file("693_UNCR.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnusableFileError, match=r"truncated|corrupt"):
        read_ct_file(path)


def test_mr_is_not_ct() -> None:
    with pytest.raises(UnusableFileError, match="modality MR, not CT"):
        read_ct_file(pydicom_file("MR_small.dcm"))


def test_no_pixel_data(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "header-only.dcm")
    with pytest.raises(UnusableFileError, match="no pixel data"):
        read_ct_file(tmp_path / "header-only.dcm")


def test_compression_without_decoder_is_named(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(tmp_path / "mpeg.dcm", enforce_file_format=True)
    with pytest.raises(UnusableFileError, match="MPEG2"):
        read_ct_file(tmp_path / "mpeg.dcm")


def test_bytes_and_path_read_the_same(tmp_path: Path) -> None:
    src = pydicom_file("CT_small.dcm")
    shutil.copy(src, tmp_path / "a.dcm")
    (a,) = read_ct_file(tmp_path / "a.dcm")
    (b,) = read_ct_file(tmp_path / "a.dcm", (tmp_path / "a.dcm").read_bytes())
    np.testing.assert_array_equal(a.hu, b.hu)


@pytest.mark.parametrize("signed", [False, True])
def test_12_bit_files_ignore_the_unused_high_bits_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, signed: bool
) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    hu = np.clip(ds.pixel_array.astype(np.int32) - 1024, -1024, 2047)  # CT_small: intercept -1024
    stored = hu if signed else hu + 1024
    raw = (stored & 0x0FFF).astype(np.uint16)  # 12-bit two's complement when signed
    raw[::2, ::3] |= 0xA000  # the unused high bits hold something else, e.g. an overlay
    ds.PixelData = raw.tobytes()
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
    ds.RescaleIntercept = 0 if signed else -1024
    ds.save_as(tmp_path / "ct12.dcm")
    with caplog.at_level("WARNING"):
        (frame,) = read_ct_file(tmp_path / "ct12.dcm")
    assert caplog.records == []  # pydicom: no "Unable to return an ndarray that's a view"
    np.testing.assert_array_equal(frame.hu, np.maximum(hu, HU_AIR).astype(np.float32))
