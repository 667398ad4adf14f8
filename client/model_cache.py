"""The models a hospital keeps between messages, so the model it trains from need not cross the
network twice.

Every round the server sends its new model to the sites to evaluate (float32), then, next
round, the same model again to train from. A site that evaluated a model keeps it here (its
state folder's ``model-cache/``, named by the run and the model's SHA-256, ``common/weights.py``
``digest``) and says so in its evaluation reply; the server then names that model by its digest
instead of sending it again (``common/flower_records.py`` ``put_model_ref``), and the site trains
from its own copy, checked against the digest when read. Only models that arrived through the
federation's authenticated channel are kept, a run can name only the models of that run, and a
missing or damaged copy is a miss that the server answers by sending the model
(server/server_app.py).

Files are safetensors (never unpickled); the newest ``KEEP`` stay (a run's current model, and
another run's on a SuperNode that serves two); no fsync: after a crash a torn file fails its
digest check and is a miss like any other. Several task processes may keep and load at once
(two runs): each file appears whole by a rename, and a file another process just removed is a
miss, never an error.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fedct.common.errors import FedCTError
from fedct.common.fileio import atomic_write
from fedct.common.weights import Layout, digest, is_digest

log = logging.getLogger(__name__)

FOLDER = "model-cache"
KEEP = 2
STALE_TEMP_S = 600.0  # a half-written file this old was left by a crashed task
_TENSOR = "model"
_LAYOUT = "layout"


class ModelNotKeptError(FedCTError):
    """The model the server named by its digest is not (or no longer intact) in this site's
    cache; the server sends it again."""


def _path(state_dir: Path, sha256: str, run_id: int) -> Path:
    if not is_digest(sha256):
        raise ModelNotKeptError(f"{sha256[:80]!r} is not a model digest (64 hex digits)")
    return Path(state_dir) / FOLDER / f"run-{int(run_id)}-{sha256}.safetensors"


def keep(state_dir: Path, flat: np.ndarray, layout: Layout, *, run_id: int) -> str:
    """Keep run ``run_id``'s packed model ``flat``/``layout``; its digest. The oldest models
    beyond ``KEEP`` go."""
    sha256 = digest(flat, layout)
    target = _path(state_dir, sha256, run_id)
    try:
        os.utime(target)  # kept before: now the newest
    except FileNotFoundError:
        metadata = {_LAYOUT: json.dumps(layout.as_config())}
        # safetensors writes from a bytes copy of the array: 45 MB more for a moment
        atomic_write(
            target,
            lambda tmp: save_file({_TENSOR: np.ascontiguousarray(flat)}, tmp, metadata=metadata),
            fsync=False,
        )
    _prune(target.parent)
    return sha256


def _prune(folder: Path) -> None:
    """Remove all but the newest ``KEEP`` models, and temporary files a crash left behind."""
    now, kept = time.time(), []
    for path in folder.iterdir():
        try:
            modified = path.stat().st_mtime
        except FileNotFoundError:  # another task's prune or rename got there first
            continue
        if path.name.startswith("."):  # atomic_write's temporary file
            if now - modified > STALE_TEMP_S:
                path.unlink(missing_ok=True)
        elif path.suffix == ".safetensors":
            kept.append((modified, path))
    for _, old in sorted(kept)[:-KEEP]:
        old.unlink(missing_ok=True)


def load(state_dir: Path, sha256: str, *, run_id: int) -> tuple[np.ndarray, Layout]:
    """Run ``run_id``'s kept model with digest ``sha256`` (flat values and layout), checked
    against it; :class:`ModelNotKeptError` when it is missing, unreadable or not that model."""
    path = _path(state_dir, sha256, run_id)
    try:
        with safe_open(str(path), "np") as handle:
            flat = handle.get_tensor(_TENSOR)
            layout = Layout.from_config(json.loads((handle.metadata() or {})[_LAYOUT]))
    except FileNotFoundError:
        raise ModelNotKeptError(f"model {sha256[:12]} is not in {path.parent}") from None
    except (SafetensorError, OSError, KeyError, TypeError, AttributeError, ValueError) as err:
        raise ModelNotKeptError(f"the kept model {path.name} cannot be read: {err}") from None
    if digest(flat, layout) != sha256:
        raise ModelNotKeptError(f"the kept model {path.name} is damaged (its digest differs)")
    return flat, layout
