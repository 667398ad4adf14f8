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
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedct.common.weights import Layout, Weights, pack, unpack

log = logging.getLogger(__name__)

ARRAYS = "arrays"
LAYOUT = "layout"
MODEL = "model"
RELATIVE = "relative-to-received"  # the layout's flag: the values are an update, not weights


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
    return unpack(flat, Layout.from_config(layout))


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
