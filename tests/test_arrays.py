"""Flower Arrays read once (common/arrays.py): the fast reads give exactly what ``Array.numpy()`` gives, a
DecodedArray serialises as Flower would, and bytes that contradict what an Array declares are refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.arrays import DecodedArray, record_of, values

SAMPLES = [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.arange(5),  # int64
    np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    np.zeros((0, 3), dtype=np.float32),
    np.array(3.5, dtype=np.float32),  # 0-d: a BatchNorm counter's shape
    np.array([True, False]),
]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda a: f"{a.dtype}{a.shape}")
def test_values_and_decoded_arrays_match_flower(sample: np.ndarray) -> None:
    flower = Array(sample)
    fast = values(flower)
    assert fast.dtype == flower.numpy().dtype and fast.shape == flower.numpy().shape
    assert np.array_equal(fast, flower.numpy()) and not fast.flags.writeable

    decoded = DecodedArray(sample)
    assert (decoded.dtype, decoded.shape, decoded.stype) == (flower.dtype, flower.shape, flower.stype)
    # its bytes are Flower's encoding of the same values (C order: a Fortran array is copied)
    assert np.array_equal(Array(dtype=decoded.dtype, shape=decoded.shape, stype=decoded.stype,
                                data=decoded.data).numpy(), sample)
    copy = decoded.numpy()
    assert np.array_equal(copy, sample) and copy.flags.writeable
    copy.fill(0)  # a caller's writes never reach the kept values
    assert np.array_equal(values(decoded), sample)


def test_decoded_array_keeps_its_own_copy_and_survives_records_and_the_wire() -> None:
    source = np.ones((2, 2), dtype=np.float32)
    decoded = DecodedArray(source)
    source[0, 0] = 7  # changed after: neither the values nor the bytes follow
    assert values(decoded)[0, 0] == 1 and Array(dtype="float32", shape=(2, 2), stype=decoded.stype,
                                                  data=decoded.data).numpy()[0, 0] == 1
    record = record_of({"w": decoded})
    assert record["w"] is decoded  # the object itself, not a copy
    assert np.array_equal(ArrayRecord({"w": decoded})["w"].numpy(), np.ones((2, 2)))  # Flower's copy: plain, equal
    blob = decoded.deflate()  # what travels: Flower's own object encoding
    assert blob == Array(np.ones((2, 2), dtype=np.float32)).deflate()


def test_bytes_that_contradict_the_declared_array_are_refused() -> None:
    """A sender controls both an Array's metadata and its bytes: a check on the declared shape must not pass values
    of another shape or dtype on to the arithmetic."""
    honest = Array(np.zeros(12, dtype=np.float32))
    for dtype, shape in (("float32", (3, 4)), ("float64", (12,)), ("int32", (12,))):
        liar = Array(dtype=dtype, shape=shape, stype=honest.stype, data=honest.data)
        with pytest.raises(ValueError, match="declares"):
            values(liar)
    short = Array(dtype="float32", shape=(12,), stype=honest.stype, data=honest.data[:-4])
    with pytest.raises(ValueError):
        values(short)
    pickled = Array(dtype="object", shape=(1,), stype=honest.stype,
                    data=honest.data.replace(b"'<f4'", b"'|O' "))
    with pytest.raises(ValueError):
        values(pickled)  # an object array would need pickle: refused, as Flower refuses it
    garbled = Array(dtype="float32", shape=(12,), stype=honest.stype,
                    data=honest.data.replace(b"'descr': '<f4'", b"'descr': (((("))
    with pytest.raises(ValueError, match="not a readable"):
        values(garbled)  # numpy's header parser raises TokenError here: still one ValueError for the caller
    for dtype in ("i8,,", "no-such-dtype"):  # SyntaxError and TypeError from numpy's dtype parser
        with pytest.raises(ValueError, match="unusable dtype"):
            values(Array(dtype=dtype, shape=(12,), stype=honest.stype, data=honest.data))
