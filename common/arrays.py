"""Flower Arrays read without parsing their bytes again and again.

A Flower ``Array`` holds its values as the bytes of an ``.npy`` file; every ``Array.numpy()`` parses the header
(with ``ast.literal_eval``) and copies the values out. The server reads each array of each train reply several
times in a round (update validation, the strategy's weighted mean, the finiteness check of the aggregate), about
2,200 parses a round for 4 sites with the default network: 0.13 s of a round's 0.2 s of aggregation on 2 cores
(docs/benchmarks.md, round-overhead section). Three remedies, all exact:

* :class:`DecodedArray`: an Array that keeps the values it was made from (the server unpacks every packed reply
  into these), so ``numpy()`` is a copy instead of a parse;
* :func:`values`: the values of any Array, with each distinct header parsed once per process (a model has a few
  dozen distinct shapes) by NumPy's own header reader, then viewed in place (read-only);
* :func:`record_of`: an ArrayRecord that holds the given Arrays themselves. ``ArrayRecord(dict)`` copies each
  Array into a new plain one, which costs a constructor per array and loses what a :class:`DecodedArray` keeps.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

__all__ = ["DecodedArray", "record_of", "values"]

_MAGIC = b"\x93NUMPY"
#: Headers kept parsed (a model has a few dozen distinct array shapes; a hostile stream of new ones stops here).
_MAX_HEADERS = 4096
_HEADERS: dict[bytes, tuple[np.dtype[Any], tuple[int, ...], bool]] = {}


class DecodedArray(Array):
    """A Flower ``Array`` of ``values`` that keeps them, read-only (a read-only array is kept as it is, a writable
    one copied), and makes the ``.npy`` bytes of ``data`` only when something asks for them.

    The server builds one per array of each reply and of the new global model, and reads most of them only as values
    (validation, the strategy's mean, packing the next round's message): serialising each on creation was a third of
    the aggregation's time.

    Args:
        values: the array, any shape and numeric dtype.
    """

    def __init__(self, values: np.ndarray) -> None:  # pylint: disable=super-init-not-called
        values = np.asarray(values)
        if values.flags.writeable or not values.flags.c_contiguous:
            # its own copy: the caller may change a writable array later, and the bytes would then disagree
            values = values.copy(order="C")  # (not ascontiguousarray: that makes a 0-d array 1-d)
        kept = values.view()
        kept.flags.writeable = False
        # set in __dict__, as Array's own constructor does: Array.__setattr__ would mark the object dirty each time
        self.__dict__.update(_values=kept, dtype=str(kept.dtype), shape=tuple(kept.shape), stype=SType.NUMPY,
                             _is_dirty=True)

    @property  # type: ignore[override]
    def data(self) -> bytes:
        """The values as ``.npy`` bytes (what ``Array(values).data`` holds), made on first use."""
        cached = self.__dict__.get("_npy")
        if cached is None:
            buffer = io.BytesIO()
            np.save(buffer, self.__dict__["_values"], allow_pickle=False)
            cached = self.__dict__["_npy"] = buffer.getvalue()
        return cached

    def deflate(self) -> bytes:
        """Flower's wire encoding of a plain ``Array`` of these values: the encoding names the object's class, and a
        receiver knows only ``Array``."""
        return Array(dtype=self.dtype, shape=self.shape, stype=self.stype, data=self.data).deflate()

    def numpy(self) -> np.ndarray:
        """A writable copy of the values (what ``Array.numpy()`` returns, without parsing the bytes)."""
        return np.array(self.__dict__["_values"])


def _parse_header(header: bytes) -> tuple[np.dtype[Any], tuple[int, ...], bool]:
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    return np.dtype(dtype), tuple(int(n) for n in shape), bool(fortran)


def values(array: Array) -> np.ndarray:
    """The values of ``array`` as ``array.numpy()`` would give them, but read-only and parsed once per distinct
    header (a :class:`DecodedArray` returns what it keeps), checked against what the Array declares.

    Anything unusual (not an ``.npy`` stream, an object dtype, too few bytes) goes through ``array.numpy()``, so
    its errors are Flower's own.

    Raises:
        ValueError: the bytes cannot be read, or hold another dtype or shape than the Array's ``dtype`` and
            ``shape`` say (a sender's lie that would otherwise pass a check made on the declared shape).
    """
    if isinstance(array, DecodedArray):
        return array.__dict__["_values"]
    try:
        out = _decode(array)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - a sender's header: numpy's parser raises SyntaxError, TokenError, ...
        raise ValueError(f"the array's bytes are not a readable .npy stream ({type(exc).__name__})") from exc
    try:
        declared = np.dtype(array.dtype), tuple(int(n) for n in array.shape)
    except Exception as exc:  # noqa: BLE001 - a sender's dtype string: TypeError, ValueError, SyntaxError, ...
        raise ValueError(f"the array declares an unusable dtype or shape ({type(exc).__name__})") from exc
    if (out.dtype, out.shape) != declared:
        raise ValueError(f"the array's bytes hold {out.dtype} values of shape {out.shape}, but it declares "
                         f"{declared[0]} of shape {declared[1]}")
    return out


def _decode(array: Array) -> np.ndarray:
    data = array.data
    if array.stype != SType.NUMPY or not isinstance(data, bytes) or data[:6] != _MAGIC or len(data) < 12:
        return array.numpy()
    major = data[6]
    if major == 1:
        start = 10 + int.from_bytes(data[8:10], "little")
    elif major == 2:
        start = 12 + int.from_bytes(data[8:12], "little")
    else:
        return array.numpy()
    header = data[:start]
    parsed = _HEADERS.get(header)
    if parsed is None:
        try:
            parsed = _parse_header(header)
        except Exception:  # noqa: BLE001 - whatever the header is, Flower's own reader says what is wrong with it
            return array.numpy()
        if parsed[0].hasobject:
            return array.numpy()  # refuses pickled objects, as it should
        if len(_HEADERS) < _MAX_HEADERS:
            _HEADERS[header] = parsed
    dtype, shape, fortran = parsed
    count = math.prod(shape)
    if len(data) - start < count * dtype.itemsize:
        return array.numpy()
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def record_of(arrays: Mapping[str, Array]) -> ArrayRecord:
    """An ArrayRecord of ``arrays`` (name -> Flower Array, in this order) holding the objects themselves, not copies.

    Arrays are shared between the records made this way: treat them as immutable (nothing in Flower or fedfusion
    sets an Array's fields after creating it).
    """
    record = ArrayRecord()
    for name, array in arrays.items():
        record[name] = array  # ArrayRecord's item check: a str key and an Array value
    return record
