"""A site's frames decoded once and kept on its own disk, on the model's grid.

Layout: ``CACHE_DIR/<grid key>/manifest.json`` and ``images.npy`` (float16 HU, one row per
frame). A file's entry is reused while its size and modification time are unchanged; when they
change its content digest decides (as git's index does), so a touched-but-identical file is not
decoded again and an edited one always is. Different grid settings live in different folders.
Windowing happens after the cache, so changing windows never rebuilds it.

It is this long because the parallel decoding that fills the cache is here too: it produces the
cache's entries and rows, so the two stay in one module.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fedct.common.dicom_io import CTFrame, UnusableFileError, read_ct_file
from fedct.common.fileio import atomic_write, atomic_write_text
from fedct.common.preprocess import Box, GridConfig, body_box, to_model_grid

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class FrameMeta:
    """What is kept of a :class:`~common.dicom_io.CTFrame` besides its pixels."""

    sop_instance_uid: str
    frame: int
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    position: float | None
    instance_number: int | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    manufacturer: str
    model: str
    hu_min: float
    hu_max: float
    rows: int
    cols: int
    crop_box: Box | None = None  # where the frame was cut to its body (grid crop = body)

    @classmethod
    def of(cls, frame: CTFrame, crop_box: Box | None = None) -> FrameMeta:
        fields = {k: v for k, v in vars(frame).items() if k != "hu"}
        return cls(**fields, rows=frame.hu.shape[0], cols=frame.hu.shape[1], crop_box=crop_box)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FrameMeta:
        spacing, box = data.get("pixel_spacing"), data.get("crop_box")
        return cls(
            **{
                **data,
                "pixel_spacing": tuple(spacing) if spacing else None,
                "crop_box": tuple(box) if box else None,
            }
        )


@dataclass
class FileEntry:
    size: int
    mtime_ns: int
    digest: str
    skip: str | None = None
    frames: list[FrameMeta] = field(default_factory=list)
    row: int = 0  # first row of this file's frames in the image array


@dataclass
class DecodedSite:
    """Every candidate file's entry (usable or skipped) and the frames' pixels on the grid."""

    entries: dict[str, FileEntry]
    images: np.ndarray  # (N, S, S) float16, rows indexed by FileEntry.row + frame
    decoded: int  # files decoded in this call (0 when everything came from the cache)


Decoder = Callable[[Path, bytes], list[CTFrame]]


def decode_site(
    site: Path,
    files: list[str],
    grid: GridConfig,
    cache_dir: Path | None,
    *,
    progress: bool = True,
    decoder: Decoder = read_ct_file,
    workers: int | None = None,
) -> DecodedSite:
    """Decode ``files`` (relative to ``site``) onto ``grid``, reusing ``cache_dir`` if given.

    Files that must be decoded are spread over ``workers`` processes, this one included
    (default: one per usable CPU, at most 8), when decoding them is measured to take long
    enough to repay starting the others.
    """
    folder = cache_dir / grid.key() if cache_dir is not None else None
    old_entries, old_images = _load(folder, grid) if folder is not None else ({}, None)

    reused = {rel: _reuse(site / rel, old_entries.get(rel), old_images) for rel in files}
    todo = [rel for rel, (entry, _) in reused.items() if entry is None]
    fresh = _decode_files(site, todo, grid, decoder, folder is not None, progress, workers)

    entries: dict[str, FileEntry] = {}
    chunks: list[np.ndarray] = []
    row = 0
    changed = bool(todo) or set(old_entries) != set(files)
    for rel in files:
        entry, pixels = fresh[rel] if rel in fresh else reused[rel]
        assert entry is not None
        if entry is not old_entries.get(rel) or entry.row != row:
            changed = True
        entry.row = row
        entries[rel] = entry
        if pixels is not None and len(pixels):
            chunks.append(pixels)
            row += len(pixels)

    size = grid.image_size
    if not changed and old_images is not None:
        images = old_images
    else:
        images = (np.concatenate(chunks) if chunks else np.zeros((0, size, size))).astype(
            np.float16
        )
        if folder is not None:
            _save(folder, grid, entries, images)
            images = np.load(folder / "images.npy", mmap_mode="r")
    if todo:
        log.debug("decoded %d of %d files of %s", len(todo), len(files), site.name)
    return DecodedSite(entries, images, len(todo))


# A spawned helper process spends CPU time before its first file (it imports pydicom, OpenCV
# and the decoders; measured in docs/benchmarks.md, Ingestion; WORKER_START_S allows for it).
# Files are decoded here first; helpers are started only when the rest is measured to take
# clearly longer than that, and this process keeps decoding while they start.
PROBE_FILES = 16
WORKER_START_S = 0.6
CHUNK_FILES = 8

Result = tuple[FileEntry, np.ndarray | None]


def _decode_files(
    site: Path,
    todo: list[str],
    grid: GridConfig,
    decoder: Decoder,
    keep: bool,
    progress: bool,
    workers: int | None,
) -> dict[str, Result]:
    work = partial(_decode_file, grid=grid, decoder=decoder, keep=keep)
    paths = [site / rel for rel in todo]
    results: list[Result] = []
    with tqdm(
        total=len(todo),
        desc=f"reading {site.name}",
        unit="file",
        leave=False,
        disable=not progress or None,
    ) as bar:
        start = time.perf_counter()
        for path in paths[:PROBE_FILES]:
            results.append(work(path))
            bar.update()
        per_file = (time.perf_counter() - start) / max(1, len(results))
        rest = paths[len(results) :]
        helpers = min(workers or _usable_cpus(), 8) - 1  # this process is one of the workers
        helpers = min(helpers, len(rest) // CHUNK_FILES)
        if (
            helpers > 0
            and per_file * len(rest) > WORKER_START_S
            and not multiprocessing.current_process().daemon
        ):
            results.extend(_decode_with_helpers(work, rest, helpers, bar))
        else:
            for path in rest:
                results.append(work(path))
                bar.update()
    return dict(zip(todo, results, strict=True))


def _decode_with_helpers(
    work: Callable[[Path], Result], paths: list[Path], helpers: int, bar: tqdm
) -> list[Result]:
    """Decode ``paths`` in this process and ``helpers`` spawned ones, in order.

    The files are queued for the helpers in chunks; this process takes chunks from the back of
    the queue (a queued chunk's future can still be cancelled) while the helpers start and
    work from the front, so starting them costs no idle time here and a site whose decoding
    turns out short is simply finished by this process. Whatever the helpers fail to deliver
    (a host script without an ``if __name__ == "__main__"`` guard, a killed helper) is decoded
    here, so a broken pool only costs time.
    """
    chunks = [paths[i : i + CHUNK_FILES] for i in range(0, len(paths), CHUNK_FILES)]
    done: list[list[Result] | None] = [None] * len(chunks)
    pool = None
    try:
        # "spawn": a fresh interpreter, safe whatever threads (torch, Ray, gRPC) run here
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(helpers, mp_context=context, initializer=_keep_freed_memory)
        futures = [pool.submit(_decode_chunk, work, chunk) for chunk in chunks]
        for future, chunk in zip(futures, chunks, strict=True):
            future.add_done_callback(partial(_count_done, bar=bar, n=len(chunk)))
        for index in reversed(range(len(chunks))):
            if not futures[index].cancel():
                break  # the helpers have reached this chunk: the ones before it are theirs
            done[index] = _decode_chunk(work, chunks[index])
            bar.update(len(chunks[index]))
        for index, future in enumerate(futures):
            if done[index] is None:
                done[index] = future.result()
    except (BrokenProcessPool, RuntimeError, OSError) as err:
        log.warning("decoding in one process (helper processes failed: %s)", err)
    finally:
        if pool is not None:
            # Not waiting: a helper still starting up when this process took the last chunk
            # exits on its own once it is up (and the interpreter joins it at exit at the latest).
            pool.shutdown(wait=False, cancel_futures=True)
    for index, chunk in enumerate(chunks):
        if done[index] is None:
            done[index] = _decode_chunk(work, chunk)
            bar.update(len(chunk))
    return [result for results in done if results is not None for result in results]


def _decode_chunk(work: Callable[[Path], Result], paths: list[Path]) -> list[Result]:
    return [work(path) for path in paths]


def _count_done(future: Future[list[Result]], *, bar: tqdm, n: int) -> None:
    if not future.cancelled() and future.exception() is None:
        bar.update(n)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may run on (containers, taskset)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _keep_freed_memory() -> None:
    """Let a decoding worker reuse freed memory instead of returning it to the OS.

    Every file allocates a few 0.5-1 MB buffers (its bytes, its HU frame). With glibc's default
    thresholds each one is a fresh ``mmap`` (or a heap that was just trimmed), so a fresh
    process pays page faults on every file and decodes well below its settled speed (measured
    in docs/benchmarks.md, Ingestion). Raising the mmap and trim thresholds (what
    ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` do) keeps the buffers in the heap.
    A worker lives only while a site is decoded, so the memory it keeps is returned at its exit.
    No-op where libc is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 128 << 20)


def _reuse(
    path: Path, old: FileEntry | None, old_images: np.ndarray | None
) -> tuple[FileEntry | None, np.ndarray | None]:
    """The cached entry and pixels of ``path`` if its content is unchanged, else Nones."""
    if old is None or (old_images is None and old.frames):
        return None, None
    try:
        stat = path.stat()
    except OSError:
        return None, None
    if (stat.st_size, stat.st_mtime_ns) != (old.size, old.mtime_ns):
        if stat.st_size != old.size or _digest(path.read_bytes()) != old.digest:
            return None, None
        old = FileEntry(stat.st_size, stat.st_mtime_ns, old.digest, old.skip, old.frames, old.row)
    pixels = old_images[old.row : old.row + len(old.frames)] if old_images is not None else None
    return old, pixels


def _decode_file(path: Path, *, grid: GridConfig, decoder: Decoder, keep: bool) -> Result:
    try:
        data = path.read_bytes()
        stat = path.stat()
    except OSError as err:
        return FileEntry(0, 0, "", skip=f"cannot be read: {err.strerror or err}"), None
    # the digest only matters for a cache that outlives this call
    entry = FileEntry(len(data), stat.st_mtime_ns, _digest(data) if keep else "")
    try:
        frames = decoder(path, data)
    except UnusableFileError as err:
        entry.skip = err.reason
        return entry, None
    boxes = [body_box(f.hu, f.pixel_spacing) if grid.crop == "body" else None for f in frames]
    entry.frames = [FrameMeta.of(f, box) for f, box in zip(frames, boxes, strict=True)]
    pixels = np.stack(
        [
            to_model_grid(f.hu, f.pixel_spacing, grid, box=b)
            for f, b in zip(frames, boxes, strict=True)
        ]
    )
    return entry, pixels.astype(np.float16)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _load(folder: Path, grid: GridConfig) -> tuple[dict[str, FileEntry], np.ndarray | None]:
    manifest_path, images_path = folder / "manifest.json", folder / "images.npy"
    if not manifest_path.is_file() or not images_path.is_file():
        return {}, None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") != MANIFEST_VERSION or manifest.get("grid") != asdict(grid):
            return {}, None
        entries = {
            rel: FileEntry(
                e["size"],
                e["mtime_ns"],
                e["digest"],
                e.get("skip"),
                [FrameMeta.from_json(f) for f in e.get("frames", [])],
                e.get("row", 0),
            )
            for rel, e in manifest["files"].items()
        }
        images = np.load(images_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        # A damaged cache only costs a rebuild: the DICOM files are the source of truth.
        log.warning("ignoring the damaged frame cache in %s (%s); rebuilding it", folder, err)
        return {}, None
    expected = sum(len(e.frames) for e in entries.values())
    if images.ndim != 3 or images.shape[0] != expected:
        log.warning("frame cache in %s does not match its manifest; rebuilding it", folder)
        return {}, None
    return entries, images


def _save(
    folder: Path, grid: GridConfig, entries: dict[str, FileEntry], images: np.ndarray
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "version": MANIFEST_VERSION,
        "grid": asdict(grid),
        "files": {rel: asdict(e) for rel, e in entries.items()},
    }
    # Write both files under temporary names, then rename: a crash never leaves a cache whose
    # manifest and images disagree (and _load checks that they agree anyway).
    atomic_write(folder / "images.npy", lambda tmp: _save_npy(tmp, images))
    atomic_write_text(folder / "manifest.json", json.dumps(manifest))


def _save_npy(path: Path, images: np.ndarray) -> None:
    with path.open("wb") as handle:  # a file handle: np.save would append ".npy" to a name
        np.save(handle, images, allow_pickle=False)
