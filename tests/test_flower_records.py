"""The model's wire format: one flat array and its layout, read back as views; every malformed
layout a peer could send is refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedct.common.flower_records import is_update, model_of, model_records, put_model, put_update
from fedct.common.models import ModelConfig, build_model
from fedct.common.weights import Layout, applied, model_weights, pack, unpack


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "scale": np.array(2.5, dtype=np.float32),  # a 0-d array
        "empty": np.zeros((0, 5), dtype=np.float32),
        "fc.bias": rng.normal(size=7).astype(np.float32),
    }


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_packed_model_reads_back_in_order_as_views(dtype: str) -> None:
    weights = _weights()
    content = RecordDict()
    put_model(content, weights, dtype)
    back = model_of(content)
    assert list(back) == list(weights)
    for key, value in weights.items():
        assert back[key].shape == value.shape
        assert back[key].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(back[key], value.astype(dtype))
        assert not back[key].flags.writeable  # views into the received bytes, not copies


def test_a_resnet_travels_as_one_array() -> None:
    weights = model_weights(build_model(ModelConfig("resnet18", num_classes=2)))
    arrays, layout = model_records(weights)
    assert list(arrays.keys()) == ["model"]
    assert len(Layout.from_config(layout).names) == len(weights) > 60


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"names": ["a", "a"], "ranks": [1, 1], "dims": [2, 2]}, "more than once"),
        ({"names": ["a"], "ranks": [2], "dims": [2]}, "ranks"),
        ({"names": ["a"], "ranks": [1], "dims": [-2]}, "negative"),
        ({"names": ["a"], "ranks": [1], "dims": [3]}, "describes 3 values"),
        ({"names": ["a"], "ranks": [1], "dims": [10**30]}, "describes"),
        ({"names": "a", "ranks": [1], "dims": [4]}, "list of str"),
        ({"names": ["a"], "ranks": [True], "dims": [4]}, "list of int"),
    ],
)
def test_a_malformed_layout_is_refused_with_its_reason(change: dict, reason: str) -> None:
    flat = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match=reason):
        unpack(flat, Layout.from_config(change))


def test_a_message_without_a_packed_model_is_refused() -> None:
    arrays, _ = model_records(_weights())
    with pytest.raises(ValueError, match="no model in FedCT's format"):
        model_of(RecordDict({"arrays": arrays}))  # the layout is missing
    flat, layout = pack(_weights())
    with pytest.raises(ValueError, match="one flat array"):
        unpack(flat.reshape(2, -1), layout)
    with pytest.raises(ValueError, match="float16 or float32"):
        unpack(flat.astype(np.int32), layout)
    with pytest.raises(ValueError, match="float16 or float32"):
        unpack(flat.astype(">f4"), layout)  # torch reads only this machine's byte order
    with pytest.raises(ValueError, match="float16 or float32"):
        unpack(flat.astype(np.float64), layout)
    assert Layout.from_config(ConfigRecord(layout.as_config())) == layout


def test_a_hostile_array_header_is_a_reason_not_a_crash() -> None:
    import io

    from flwr.app import Array

    header = io.BytesIO()  # an .npy header claiming 10^30 values
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**30,)}
    )
    _, layout = model_records(_weights())
    for array in (
        Array("<f4", (4,), "numpy.ndarray", header.getvalue()),
        Array("<f4", (4,), "torch.raw", b"\0" * 16),  # not NumPy's serialisation
    ):
        content = RecordDict({"arrays": ArrayRecord({"model": array}), "layout": layout})
        with pytest.raises(ValueError, match="cannot be read"):
            model_of(content)


def test_a_float16_update_keeps_the_changes_that_float16_weights_would_round_away() -> None:
    """A site's reply: the update trained - received in float16. Added back to the model sent,
    it gives the trained weights to float16's precision of the *change* (relative 1e-3), where
    float16 weights would be off by more than the change itself."""
    rng = np.random.default_rng(0)
    sent = {"w": rng.normal(0, 1, 10_000).astype(np.float32)}
    change = rng.normal(0, 1e-4, 10_000).astype(np.float32)  # one round's small steps
    trained = {"w": sent["w"] + change}
    content = RecordDict()
    put_update(content, trained, sent)
    assert is_update(content)
    update = model_of(content)
    assert update["w"].dtype == np.float16
    assert not update["w"].flags.writeable
    error = np.linalg.norm(applied(update, sent)["w"] - trained["w"]) / np.linalg.norm(change)
    assert error < 2e-3
    as_weights = RecordDict()
    put_model(as_weights, trained, "float16")
    assert not is_update(as_weights)
    rounded = model_of(as_weights)["w"].astype(np.float32)
    assert np.linalg.norm(rounded - trained["w"]) / np.linalg.norm(change) > 0.5


def test_an_update_float16_cannot_hold_goes_as_float32(caplog: pytest.LogCaptureFixture) -> None:
    sent = {"w": np.zeros(3, np.float32)}
    content = RecordDict()
    put_update(content, {"w": np.array([1.0, 7e4, -2.0], np.float32)}, sent)
    update = model_of(content)
    assert is_update(content)
    assert update["w"].dtype == np.float32
    np.testing.assert_array_equal(update["w"], [1.0, 7e4, -2.0])
    assert "beyond float16's range" in caplog.text
