"""Model weights as they cross the network: named NumPy arrays, checked on arrival.

Both sides check what they receive against the model they build from the same factory: the
client checks the global model before using it, the server checks every update before
aggregating it. A problem is reported as a one-line reason, never by crashing the round.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

Weights = dict[str, np.ndarray]


def model_weights(model: nn.Module, dtype: str = "float32") -> Weights:
    """The model's floating-point state as named arrays in ``dtype`` (float32 or float16)."""
    return {
        k: v.detach().cpu().numpy().astype(dtype, copy=True) for k, v in model.state_dict().items()
    }


def load_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load ``weights`` (any float dtype) into ``model`` as float32."""
    state = {k: torch.from_numpy(_writable(np.asarray(v, np.float32))) for k, v in weights.items()}
    model.load_state_dict(state, strict=True)


def _writable(array: np.ndarray) -> np.ndarray:
    # torch warns about tensors over read-only memory (a received model's views)
    return array if array.flags.writeable else array.copy()


def weight_problem(
    weights: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    max_distance: float | None = None,
    relative: bool = False,
) -> str | None:
    """Why ``weights`` cannot be used in place of ``reference`` (keys, shapes, dtypes,
    non-finite values, L2 distance above ``max_distance``), or ``None`` if they can. With
    ``relative``, ``weights`` is an update to be added to ``reference``: its distance is its
    own norm."""
    missing = sorted(set(reference) - set(weights))
    extra = sorted(set(weights) - set(reference))
    if missing or extra:
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
    squared = 0.0
    scratch = np.empty(_BLOCK, dtype=np.float32)
    for key, ref in reference.items():
        value = np.asarray(weights[key])
        if value.shape != ref.shape:
            return f"{key} has shape {value.shape}, expected {ref.shape}"
        if value.dtype.kind != "f":
            return f"{key} has dtype {value.dtype}, expected floating point"
        # One pass for both checks: a NaN or infinity anywhere makes the squared distance
        # non-finite (the reference is finite); only then is the exact reason looked for.
        key_squared = _squared_distance(value, None if relative else ref, scratch)
        if not np.isfinite(key_squared):
            if not np.isfinite(value).all():
                return f"{key} has non-finite values"
            diff = value.astype(np.float64) - (0 if relative else ref)  # overflowing float32
            key_squared = float(np.dot(diff.ravel(), diff.ravel()))
        squared += key_squared
    if max_distance is not None and squared > max_distance**2:
        return f"update norm {np.sqrt(squared):.3g} exceeds the limit {max_distance:g}"
    return None


# Differences are taken a block at a time into one cache-sized scratch buffer: no model-sized
# temporary per update, and the dot product reads the block while it is still in cache.
_BLOCK = 1 << 18  # float32 values (1 MiB)


def _squared_distance(value: np.ndarray, ref: np.ndarray | None, scratch: np.ndarray) -> float:
    """``||value - ref||²`` (``ref`` None: ``||value||²``) in float32, whatever ``value`` is."""
    flat_value = value.reshape(-1)
    total = 0.0
    for start in range(0, flat_value.size, _BLOCK):
        stop = min(start + _BLOCK, flat_value.size)
        diff = scratch[: stop - start]
        if ref is None:
            np.copyto(diff, flat_value[start:stop])
        else:
            np.subtract(flat_value[start:stop], ref.reshape(-1)[start:stop], out=diff)
        total += float(np.dot(diff, diff))
    return total


def applied(update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> Weights:
    """``base + update`` as new float32 arrays (an update validated against ``base``)."""
    return {k: np.add(ref, update[k], dtype=np.float32) for k, ref in base.items()}


# --- one flat array on the wire -------------------------------------------------------------
# Flower moves every array of a message as its own object, one HTTP request each (plus one per
# 5 MB chunk), and each request costs ~15-20 ms on top of its bytes: a ResNet-18's 62 arrays
# took ~130 requests per hop. FedCT therefore sends the model as one flat array and a layout
# (names and shapes, in order); Flower offers no such packing, so it is written here.
MAX_LAYOUT_ARRAYS = 10_000  # far above any torchvision model's state dict
# what a model may travel as (FederationConfig's transfer dtypes), in this machine's byte order:
# torch reads nothing else, so anything else is refused on arrival
WIRE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


def pack(weights: Mapping[str, np.ndarray], dtype: str = "float32") -> tuple[np.ndarray, Layout]:
    """``weights`` as one flat ``dtype`` array and the layout that names its parts."""
    names = list(weights)
    shapes = [tuple(int(d) for d in np.shape(weights[n])) for n in names]
    flat = np.empty(sum(math.prod(s) for s in shapes), dtype=dtype)
    offset = 0
    for name, shape in zip(names, shapes, strict=True):
        size = math.prod(shape)
        flat[offset : offset + size] = np.asarray(weights[name]).reshape(-1)
        offset += size
    return flat, Layout(names, shapes)


def unpack(flat: np.ndarray, layout: Layout) -> Weights:
    """Named read-only views into ``flat`` (no copy); ValueError when they do not fit it."""
    if flat.ndim != 1:
        raise ValueError(f"a packed model is one flat array, got shape {flat.shape}")
    if flat.dtype not in WIRE_DTYPES:
        raise ValueError(f"a packed model holds float16 or float32 values, got {flat.dtype}")
    sizes = [math.prod(s) for s in layout.shapes]
    if sum(sizes) != flat.size:
        raise ValueError(
            f"the layout describes {sum(sizes)} values but the packed model holds {flat.size}"
        )
    out: Weights = {}
    offset = 0
    for name, shape, size in zip(layout.names, layout.shapes, sizes, strict=True):
        part = flat[offset : offset + size].reshape(shape)
        part.flags.writeable = False
        out[name] = part
        offset += size
    return out


def digest(flat: np.ndarray, layout: Layout) -> str:
    """The SHA-256 of a packed model (its values' dtype, its layout and its bytes): two packed
    models share it only when they unpack to the same weights."""
    sha = hashlib.sha256()
    header = {"dtype": flat.dtype.str, **layout.as_config()}
    sha.update(json.dumps(header, sort_keys=True).encode())
    sha.update(np.ascontiguousarray(flat).data)
    return sha.hexdigest()


def is_digest(text: object) -> bool:
    """Whether ``text`` is a digest as :func:`digest` writes it (64 lowercase hex digits)."""
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class Layout:
    """The names and shapes of a packed model's arrays, in order."""

    names: list[str]
    shapes: list[tuple[int, ...]]

    def as_config(self) -> dict[str, Any]:
        """Flat lists (what a Flower ConfigRecord holds): names, ranks, then every dimension."""
        return {
            "names": list(self.names),
            "ranks": [len(s) for s in self.shapes],
            "dims": [d for s in self.shapes for d in s],
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Layout:
        """The layout a peer sent; ValueError (a one-line reason) when it is malformed."""
        names = _list_of(config, "names", str)
        ranks = _list_of(config, "ranks", int)
        dims = _list_of(config, "dims", int)
        if len(names) > MAX_LAYOUT_ARRAYS or len(set(names)) != len(names):
            raise ValueError("the model's layout names its arrays more than once or too often")
        if len(ranks) != len(names) or any(r < 0 for r in ranks) or sum(ranks) != len(dims):
            raise ValueError("the model's layout has ranks that do not match its names or dims")
        if any(d < 0 for d in dims):
            raise ValueError("the model's layout has a negative dimension")
        shapes, at = [], 0
        for rank in ranks:
            shapes.append(tuple(dims[at : at + rank]))
            at += rank
        return cls(names, shapes)


def _list_of(config: Mapping[str, Any], key: str, kind: type) -> list[Any]:
    value = config.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"the model's layout must give {key} as a list of {kind.__name__}")
    return value
