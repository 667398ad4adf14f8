"""The model inside a Flower message: one flat array and its layout (``common/weights.py``).

The one place that knows how FedCT's messages carry a model, for the ServerApp, the ClientApp
and the replies the server's tests make: an ``ArrayRecord`` ``"arrays"`` holding the single
array ``"model"``, and a ``ConfigRecord`` ``"layout"`` naming its parts. Flower's strategies
see one array per message, which every one of their rules treats element by element.

A site's trained model travels as its **update**: the trained weights less the ones it received
(``put_update``; the layout says so, ``is_update``), which the server validates and averages as
it is and adds to the model it sent. The update carries the same information, but its values are
a round's small changes, which float16 (``update-dtype``) keeps to ~3 significant digits where
it would round the weights themselves by more than one step of training changes them: half the
bytes of the slowest crossing, the site's upload (accuracy measured in docs/benchmarks.md).

A model a site already keeps (client/model_cache.py: the one it evaluated last) is named
instead of sent: a ``ConfigRecord`` ``"model-ref"`` with its digest (``put_model_ref``), and no
arrays. A site says which model it keeps in its evaluation reply (``HOLDS``, in its ``"site"``
record).
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedct.common.weights import Layout, Weights, is_digest, pack, unpack

log = logging.getLogger(__name__)

ARRAYS = "arrays"
LAYOUT = "layout"
MODEL = "model"
RELATIVE = "relative-to-received"  # the layout's flag: the values are an update, not weights
MODEL_REF = "model-ref"  # a model the site keeps, named by its digest instead of sent
HOLDS = "holds-model"  # in a site's evaluation reply: the digest of the model it now keeps
MODEL_NEEDED = "model-needed"  # a train reply's status: the named model is not kept; send it


def model_records(weights: Weights, dtype: str = "float32") -> tuple[ArrayRecord, ConfigRecord]:
    """``weights`` packed into one ``dtype`` array, and its layout; as float32 when float16
    cannot hold them (a value beyond 65504 would arrive as an infinity)."""
    flat, layout = pack(weights, dtype)
    if flat.dtype == np.float16 and not np.isfinite(flat).all():
        log.warning("the model has values beyond float16's range; sending it as float32")
        flat, layout = pack(weights, "float32")
    return ArrayRecord({MODEL: Array(flat)}), ConfigRecord(layout.as_config())


def put_model(content: RecordDict, weights: Weights, dtype: str = "float32") -> None:
    """Add ``weights`` to a message's content (replacing any model it held)."""
    content[ARRAYS], content[LAYOUT] = model_records(weights, dtype)


def put_model_ref(content: RecordDict, sha256: str) -> None:
    """Name the model by its digest (the site keeps it) instead of sending it: any arrays the
    content held (a strategy's own record of the model) are dropped."""
    content.pop(ARRAYS, None)
    content.pop(LAYOUT, None)
    content[MODEL_REF] = ConfigRecord({"sha256": sha256})


def model_ref(content: RecordDict) -> str | None:
    """The digest of the kept model a message names instead of carrying one, if it does."""
    ref = content.config_records.get(MODEL_REF)
    if ref is None:
        return None
    sha256 = ref.get("sha256")
    if not is_digest(sha256):
        raise ValueError("the message names a kept model without a digest (64 hex digits)")
    return str(sha256)


def put_update(
    content: RecordDict, trained: Weights, received: Weights, dtype: str = "float16"
) -> None:
    """Add the update ``trained - received`` (computed in float32, sent as ``dtype``)."""
    update = {k: np.subtract(v, received[k], dtype=np.float32) for k, v in trained.items()}
    put_model(content, update, dtype)
    content.config_records[LAYOUT][RELATIVE] = True


def has_model(content: RecordDict) -> bool:
    return ARRAYS in content.array_records


def is_update(content: RecordDict) -> bool:
    """Whether the message's model is an update relative to the model its site received."""
    layout = content.config_records.get(LAYOUT)
    return layout is not None and layout.get(RELATIVE, False) is True


def model_of(content: RecordDict) -> Weights:
    """The model (or update, :func:`is_update`) a message carries, as named read-only views (no
    copy); ValueError with a one-line reason when it is not a model in FedCT's format."""
    return unpack(*packed_of(content))


def packed_of(content: RecordDict) -> tuple[np.ndarray, Layout]:
    """The packed model a message carries (a read-only view) and its layout; ValueError as
    :func:`model_of`."""
    arrays = content.array_records.get(ARRAYS)
    layout = content.config_records.get(LAYOUT)
    if arrays is None or layout is None or list(arrays.keys()) != [MODEL]:
        raise ValueError(
            "the message holds no model in FedCT's format (one packed array and its layout); "
            "is the other side running another FedCT version?"
        )
    try:
        flat = array_view(arrays[MODEL])
    except (TypeError, OverflowError) as err:  # what numpy and Flower raise on hostile headers
        raise ValueError(f"the packed model cannot be read: {err}") from err
    return flat, Layout.from_config(layout)


def array_view(array: Array) -> np.ndarray:
    """A read-only view of an Array's values, without the copy ``Array.numpy()`` makes.

    Hand-written (numpy reads .npy only from files or by copying): reading every update through
    views instead of copies saves one full memory pass per update on the server.
    """
    data = array.data
    if array.stype != "numpy.ndarray":
        return array.numpy()  # let Flower say what it cannot read
    stream = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(stream)
    read_header = (
        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not model weights")
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C")
