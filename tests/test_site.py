from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from fedct.common.dicom_io import CTFrame, read_ct_file
from fedct.common.errors import SiteDataError
from fedct.common.frame_cache import decode_site
from fedct.common.labels import discover
from fedct.common.preprocess import GridConfig
from fedct.common.site import load_site

GRID = GridConfig(image_size=32)


def read_labels(site: Path) -> list[dict[str, str]]:
    with (site / "labels.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_synthetic_site_round_trip(tiny_site: Path) -> None:
    site = load_site(tiny_site, grid=GRID, progress=False)
    rows = read_labels(tiny_site)
    assert len(site.slices) == len(rows)
    assert not site.skipped
    by_path = {r["path"]: r["label"] for r in rows}
    assert all(by_path[s.path] == s.label for s in site.slices)
    assert site.images.shape == (len(rows), 32, 32)
    assert site.images.dtype == np.float16
    assert float(site.images.min()) >= -1024
    assert float(site.images.max()) > 100


def test_slices_are_ordered_by_position_within_series(tiny_site: Path) -> None:
    site = load_site(tiny_site, grid=GRID, progress=False)
    series: dict[str, list[float]] = {}
    for s in site.slices:
        series.setdefault(s.meta.series_instance_uid, []).append(s.meta.position or 0.0)
    for positions in series.values():
        assert positions == sorted(positions)


def test_patient_split_has_no_leakage(tiny_site: Path) -> None:
    site = load_site(tiny_site, grid=GRID, progress=False)
    splits: dict[str, set[str]] = {}
    for s in site.slices:
        splits.setdefault(s.patient_key, set()).add(s.split)
    assert all(len(v) == 1 for v in splits.values())
    assert {"train", "val"} <= {next(iter(v)) for v in splits.values()}
    again = load_site(tiny_site, grid=GRID, progress=False)
    assert [s.split for s in again.slices] == [s.split for s in site.slices]


def test_explicit_split_column_wins(tiny_site: Path) -> None:
    rows = read_labels(tiny_site)
    for row in rows:
        row["split"] = "test"
    with (tiny_site / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    site = load_site(tiny_site, grid=GRID, progress=False)
    assert {s.split for s in site.slices} == {"test"}
    assert site.eval_split() == "test"


def test_series_labels_apply_to_all_slices(tiny_site: Path) -> None:
    site = load_site(tiny_site, grid=GRID, progress=False)
    series = sorted({s.meta.series_instance_uid for s in site.slices})
    with (tiny_site / "labels.csv").open("w", newline="") as handle:
        handle.write("series_instance_uid,label\n")
        for i, uid in enumerate(series):
            handle.write(f"{uid},{'nodule' if i % 2 else 'normal'}\n")
    relabelled = load_site(tiny_site, grid=GRID, progress=False)
    assert len(relabelled.slices) == len(site.slices)
    assert {s.label_level for s in relabelled.slices} == {"series"}
    for s in relabelled.slices:
        assert s.label == ("nodule" if series.index(s.meta.series_instance_uid) % 2 else "normal")


def test_class_folders_layout(tmp_path: Path) -> None:
    ct = Path(str(get_testdata_file("CT_small.dcm")))
    for cls in ("normal", "nodule"):
        (tmp_path / cls / "a" / "b").mkdir(parents=True)
        shutil.copy(ct, tmp_path / cls / "a" / "b" / "IM0001")  # no extension, as PACS exports
    (tmp_path / "README.txt").write_text("notes")
    site = load_site(tmp_path, grid=GRID, progress=False)
    assert site.mode == "folders"
    assert sorted(s.label for s in site.slices) == ["nodule", "normal"]
    assert [(s.path, s.reason) for s in site.skipped] == [
        ("README.txt", "outside any class folder")
    ]


def test_bad_files_are_skipped_not_fatal(tiny_site: Path) -> None:
    first = read_labels(tiny_site)[0]["path"]
    data = (tiny_site / first).read_bytes()
    (tiny_site / first).write_bytes(data[:-200])  # cut inside the pixel data
    (tiny_site / "junk.dcm").write_bytes(os.urandom(1000))
    mr = Path(str(get_testdata_file("MR_small.dcm")))
    shutil.copy(mr, tiny_site / "mr.dcm")
    site = load_site(tiny_site, grid=GRID, progress=False)
    reasons = {s.path: s.reason for s in site.skipped}
    assert "truncated" in reasons[first] or "corrupt" in reasons[first]
    assert reasons["junk.dcm"].startswith("not a")
    assert reasons["mr.dcm"] == "modality MR, not CT"
    assert len(site.slices) == len(read_labels(tiny_site)) - 1
    site.require_trainable(["normal", "nodule"])


def test_site_without_usable_images_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "normal").mkdir()
    (tmp_path / "normal" / "x.dcm").write_bytes(b"not dicom at all")
    site = load_site(tmp_path, grid=GRID, progress=False)
    with pytest.raises(SiteDataError, match="no usable CT images"):
        site.require_trainable()


def test_single_class_site_fails_clearly(tiny_site: Path) -> None:
    rows = read_labels(tiny_site)
    with (tiny_site / "labels.csv").open("w", newline="") as handle:
        handle.write("path,label\n" + "".join(f"{r['path']},normal\n" for r in rows))
    site = load_site(tiny_site, grid=GRID, progress=False)
    with pytest.raises(SiteDataError, match="single class"):
        site.require_trainable()


def test_unknown_label_fails_against_federation_classes(tiny_site: Path) -> None:
    site = load_site(tiny_site, grid=GRID, progress=False)
    with pytest.raises(SiteDataError, match="does not know"):
        site.require_trainable(["normal", "tumour"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,diagnosis_code\nx.dcm,1\n", "label"),  # 'diagnosis_code' is no label column
        ("label\nnodule\n", "names no image"),
        ("path,label,split\nx.dcm,nodule,holdout\n", "holdout"),
        (b"\xff\xfe\x00garbage", "UTF-8"),
    ],
)
def test_unreadable_labels_file(tiny_site: Path, content: str | bytes, message: str) -> None:
    target = tiny_site / "labels.csv"
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    with pytest.raises(SiteDataError, match=message):
        discover(tiny_site)


def test_missing_labels_are_reported(tiny_site: Path) -> None:
    rows = read_labels(tiny_site)
    with (tiny_site / "labels.csv").open("w", newline="") as handle:
        handle.write("path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows[1:]))
        handle.write("does/not/exist.dcm,normal\n")
    site = load_site(tiny_site, grid=GRID, progress=False)
    assert (rows[0]["path"], "not labelled in labels.csv") in {
        (s.path, s.reason) for s in site.skipped
    }
    assert any("does/not/exist.dcm" in p for p in site.problems)


def test_cache_hit_skips_decoding(tiny_site: Path, tmp_path: Path) -> None:
    files = discover(tiny_site).files
    calls: list[Path] = []

    def counting(path: Path, data: bytes) -> list:
        from fedct.common.dicom_io import read_ct_file

        calls.append(path)
        return read_ct_file(path, data)

    cache = tmp_path / "cache"
    first = decode_site(tiny_site, files, GRID, cache, progress=False, decoder=counting)
    assert len(calls) == len(files)
    assert first.decoded == len(files)
    calls.clear()
    second = decode_site(tiny_site, files, GRID, cache, progress=False, decoder=counting)
    assert calls == []
    assert second.decoded == 0
    np.testing.assert_array_equal(np.asarray(first.images), np.asarray(second.images))

    # touched but identical: still no decoding; edited: exactly that file is decoded again
    os.utime(tiny_site / files[0], ns=(1, 1))
    decode_site(tiny_site, files, GRID, cache, progress=False, decoder=counting)
    assert calls == []
    data = bytearray((tiny_site / files[1]).read_bytes())
    data[-10:] = bytes(10)
    (tiny_site / files[1]).write_bytes(bytes(data))
    decode_site(tiny_site, files, GRID, cache, progress=False, decoder=counting)
    assert calls == [tiny_site / files[1]]


_PROBED: list[Path] = []


def _decode_after_a_helper(path: Path, data: bytes) -> list[CTFrame]:
    """read_ct_file that leaves a mark named after the process decoding; in the test's own
    process, once past the probe, it waits for a helper's mark, so the helpers surely take part."""
    marks = Path(os.environ["FEDCT_TEST_MARKS"])
    (marks / str(os.getpid())).touch()
    if os.getpid() == int(os.environ["FEDCT_TEST_PARENT"]):
        _PROBED.append(path)
        if len(_PROBED) > 2:  # the probe (PROBE_FILES = 2 below) is this process's alone
            deadline = time.monotonic() + 30
            while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
    return read_ct_file(path, data)


def test_helper_processes_decode_exactly_what_one_process_does(
    tiny_site: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import fedct.common.frame_cache as frame_cache

    files = discover(tiny_site).files
    serial = decode_site(tiny_site, files, GRID, None, progress=False, workers=1)
    # make helpers worth starting even for this tiny site: probe 2 files, free start, 1 a chunk
    monkeypatch.setattr(frame_cache, "PROBE_FILES", 2)
    monkeypatch.setattr(frame_cache, "WORKER_START_S", 0.0)
    monkeypatch.setattr(frame_cache, "CHUNK_FILES", 1)
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("FEDCT_TEST_MARKS", str(marks))
    monkeypatch.setenv("FEDCT_TEST_PARENT", str(os.getpid()))
    _PROBED.clear()
    pooled = decode_site(
        tiny_site,
        files,
        GRID,
        tmp_path / "cache",
        progress=False,
        workers=2,
        decoder=_decode_after_a_helper,
    )
    assert pooled.decoded == len(files)
    assert "helper processes failed" not in caplog.text
    assert len(list(marks.iterdir())) == 2  # this process and one helper both decoded files
    assert len(_PROBED) < len(files)
    np.testing.assert_array_equal(np.asarray(pooled.images), np.asarray(serial.images))
    for rel in files:
        assert pooled.entries[rel].frames == serial.entries[rel].frames
        assert pooled.entries[rel].skip == serial.entries[rel].skip
        assert pooled.entries[rel].digest  # the cache keeps content digests


def test_cache_is_keyed_by_preprocessing(tiny_site: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = load_site(tiny_site, grid=GridConfig(32), cache_dir=cache, progress=False)
    b = load_site(tiny_site, grid=GridConfig(48), cache_dir=cache, progress=False)
    assert a.images.shape[1:] == (32, 32)
    assert b.images.shape[1:] == (48, 48)
    assert len(list(cache.iterdir())) == 2


def test_damaged_cache_is_rebuilt(tiny_site: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    good = load_site(tiny_site, grid=GRID, cache_dir=cache, progress=False)
    (cache / GRID.key() / "manifest.json").write_text("{not json")
    again = load_site(tiny_site, grid=GRID, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(np.asarray(good.images), np.asarray(again.images))
