"""A site's kept models (client/model_cache.py) and the digest that names them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from fedct.client import model_cache
from fedct.client.model_cache import KEEP, ModelNotKeptError, keep, load
from fedct.common.weights import Layout, digest, pack

RUN = 7
WEIGHTS = {
    "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7,
    "fc.bias": np.array([0.5, -1.25], np.float32),
}


def _packed(shift: float = 0.0, dtype: str = "float32") -> tuple[np.ndarray, Layout]:
    return pack({k: v + np.float32(shift) for k, v in WEIGHTS.items()}, dtype)


def test_a_kept_model_loads_back_exactly(tmp_path: Path) -> None:
    flat, layout = _packed()
    sha256 = keep(tmp_path, flat, layout, run_id=RUN)
    assert sha256 == digest(flat, layout)
    loaded, loaded_layout = load(tmp_path, sha256, run_id=RUN)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, flat)
    assert loaded_layout == layout


def test_the_digest_tells_values_dtype_and_layout_apart() -> None:
    flat, layout = _packed()
    assert digest(flat, layout) == digest(flat.copy(), Layout(list(layout.names), layout.shapes))
    assert digest(*_packed(shift=1e-6)) != digest(flat, layout)
    assert digest(*_packed(dtype="float16")) != digest(flat, layout)
    # the same bytes read as other arrays are another model
    other = Layout(["fc.bias", "conv.weight"], [(2,), (2, 3, 2, 2)])
    assert digest(flat, other) != digest(flat, layout)


def test_a_model_not_kept_is_a_miss(tmp_path: Path) -> None:
    with pytest.raises(ModelNotKeptError, match="is not in"):
        load(tmp_path, digest(*_packed()), run_id=RUN)


@pytest.mark.parametrize("name", ["../../etc/passwd", "ab" * 31, "G" * 64, ""])
def test_only_a_digest_names_a_kept_model(tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelNotKeptError, match="not a model digest"):
        load(tmp_path, name, run_id=RUN)


def test_a_damaged_copy_is_a_miss_not_a_model(tmp_path: Path) -> None:
    sha256 = keep(tmp_path, *_packed(), run_id=RUN)
    path = tmp_path / model_cache.FOLDER / f"run-{RUN}-{sha256}.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one value's byte
    path.write_bytes(bytes(data))
    with pytest.raises(ModelNotKeptError, match="damaged"):
        load(tmp_path, sha256, run_id=RUN)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelNotKeptError, match="cannot be read"):
        load(tmp_path, sha256, run_id=RUN)


def test_only_the_newest_models_are_kept(tmp_path: Path) -> None:
    digests = []
    for i in range(KEEP + 2):
        digests.append(keep(tmp_path, *_packed(shift=float(i)), run_id=RUN))
        # distinct modification times even on coarse file systems
        for j, old in enumerate(digests):
            path = tmp_path / model_cache.FOLDER / f"run-{RUN}-{old}.safetensors"
            if path.exists():
                os.utime(path, ns=(j * 10**9, j * 10**9))
    kept = sorted(p.stem for p in (tmp_path / model_cache.FOLDER).glob("*.safetensors"))
    assert kept == sorted(f"run-{RUN}-{d}" for d in digests[-KEEP:])
    # keeping an older model again makes it the newest: it survives the next one
    keep(tmp_path, *_packed(shift=float(KEEP)), run_id=RUN)
    keep(tmp_path, *_packed(shift=99.0), run_id=RUN)
    load(tmp_path, digests[KEEP], run_id=RUN)
    with pytest.raises(ModelNotKeptError):
        load(tmp_path, digests[-1], run_id=RUN)


def test_a_run_loads_only_its_own_kept_models(tmp_path: Path) -> None:
    sha256 = keep(tmp_path, *_packed(), run_id=RUN)
    with pytest.raises(ModelNotKeptError, match="is not in"):
        load(tmp_path, sha256, run_id=RUN + 1)


def test_what_a_crashed_task_left_half_written_goes_in_time(tmp_path: Path) -> None:
    folder = tmp_path / model_cache.FOLDER
    folder.mkdir()
    stale, fresh = folder / ".run-7-x.safetensors.old", folder / ".run-7-y.safetensors.new"
    for path in (stale, fresh):
        path.write_bytes(b"torn")
    old = time.time() - model_cache.STALE_TEMP_S - 1
    os.utime(stale, (old, old))
    keep(tmp_path, *_packed(), run_id=RUN)
    assert not stale.exists()
    assert fresh.exists()  # perhaps another task's write in progress
