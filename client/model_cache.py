"""The models a hospital keeps between messages, so the model it trains from need not cross the
network twice.

Every round the server sends its new model to the sites to evaluate (float32), then, next
round, the same model again to train from. A site that evaluated a model keeps it here (its
state folder's ``model-cache/``, named by the model's SHA-256, ``common/weights.py``
``digest``) and says so in its evaluation reply; the server then names that model by its digest
instead of sending it again (``common/flower_records.py`` ``put_model_ref``), and the site trains
from its own copy, checked against the digest when read. Only models that arrived through the
federation's authenticated channel are kept, nothing else is read, and a missing or damaged
copy is a miss that the server answers by sending the model (server/server_app.py).

Files are safetensors (never unpickled); the newest ``KEEP`` stay (a run's current model, and
another run's on a SuperNode that serves two); no fsync: after a crash a torn file fails its
digest check and is a miss like any other.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fedct.common.errors import FedCTError
from fedct.common.fileio import atomic_write
from fedct.common.weights import Layout, digest

log = logging.getLogger(__name__)

FOLDER = "model-cache"
KEEP = 2
_TENSOR = "model"
_LAYOUT = "layout"


class ModelNotKeptError(FedCTError):
    """The model the server named by its digest is not (or no longer intact) in this site's
    cache; the server sends it again."""


def _path(state_dir: Path, sha256: str) -> Path:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ModelNotKeptError(f"{sha256[:80]!r} is not a model digest (64 hex digits)")
    return Path(state_dir) / FOLDER / f"{sha256}.safetensors"


def keep(state_dir: Path, flat: np.ndarray, layout: Layout) -> str:
    """Keep the packed model ``flat``/``layout``; its digest. The oldest beyond ``KEEP`` go."""
    sha256 = digest(flat, layout)
    target = _path(state_dir, sha256)
    if not target.exists():
        metadata = {_LAYOUT: json.dumps(layout.as_config())}
        atomic_write(
            target,
            lambda tmp: save_file({_TENSOR: np.ascontiguousarray(flat)}, tmp, metadata=metadata),
            fsync=False,
        )
    target.touch()  # the newest, whether written now or before
    kept = sorted(target.parent.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    for old in kept[:-KEEP]:
        old.unlink(missing_ok=True)
    return sha256


def load(state_dir: Path, sha256: str) -> tuple[np.ndarray, Layout]:
    """The kept model with digest ``sha256`` (flat values and layout), checked against it;
    :class:`ModelNotKeptError` when it is missing, unreadable or not that model."""
    path = _path(state_dir, sha256)
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
