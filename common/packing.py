"""Model arrays as one flat vector on the wire: one object per message instead of one per tensor.

Flower moves every Array of a message as its own object: in a deployment one HTTPS request (SuperNode and
SuperLink) and one runtime-API request (SuperNode and ClientApp process) per tensor and hop, 232 of them for the
default attention network, which made pulling and pushing the arrays most of a deployed site's per-message time
(docs/benchmarks.md, site-latency section). The ServerApp therefore sends the global model as a single Array named
``fedfusion-packed:<layout digest>`` holding every tensor, flattened and concatenated in the model's state-dict
order; a site that receives a packed model replies packed, and the server unpacks replies before anything else
reads them, so validation, aggregation and checkpoints still see the named arrays.

The layout (names, shapes, one dtype) is never sent: both sides know it, the server from its global arrays, a site
from the network its run config builds. Its digest in the Array's name makes a mismatch (another model, another
version) a clear refusal rather than values reshaped into the wrong tensors. A model whose arrays have several
dtypes is sent per name, as are replies of sites that received per-name arrays.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from common.arrays import values
from models.config import ModelConfig

__all__ = ["PACKED_PREFIX", "Layout", "is_packed", "layout_of", "model_layout", "pack", "unpack"]

#: Name prefix of the single Array of a packed record (the layout digest follows the colon).
PACKED_PREFIX = "fedfusion-packed:"


class Layout:
    """Names, shapes and the common dtype of a model's arrays, in state-dict order."""

    def __init__(self, entries: Sequence[tuple[str, tuple[int, ...]]], dtype: str) -> None:
        self.entries = tuple((str(n), tuple(int(s) for s in shape)) for n, shape in entries)
        self.dtype = np.dtype(dtype).str
        blob = json.dumps([self.entries, self.dtype]).encode()
        self.digest = hashlib.sha256(blob).hexdigest()[:16]
        self.size = sum(math.prod(shape) for _, shape in self.entries)

    @property
    def key(self) -> str:
        """The packed Array's name for this layout."""
        return PACKED_PREFIX + self.digest


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, Array):
        return values(value)
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def layout_of(arrays: Mapping[str, Any]) -> Layout | None:
    """The layout of ``arrays`` (numpy arrays, tensors or Flower Arrays), or ``None`` when their dtypes differ."""
    values = {name: _as_numpy(v) for name, v in arrays.items()}
    dtypes = {v.dtype.str for v in values.values()}
    if len(dtypes) != 1:
        return None
    return Layout([(n, v.shape) for n, v in values.items()], dtypes.pop())


@functools.lru_cache(maxsize=8)
def _model_layout(cfg_json: str) -> Layout | None:
    from models.network import build_model

    return layout_of(build_model(ModelConfig.from_json(cfg_json)).state_dict())


def model_layout(cfg: ModelConfig) -> Layout | None:
    """The layout of the network ``cfg`` builds (cached per process)."""
    return _model_layout(cfg.to_json())


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` is one packed vector (:func:`pack`)."""
    keys = list(record.keys())
    return len(keys) == 1 and keys[0].startswith(PACKED_PREFIX)


def pack(arrays: Mapping[str, Any]) -> ArrayRecord:
    """``arrays`` as one flat Array (see the module docstring), or per name when their dtypes differ."""
    layout = layout_of(arrays)
    if layout is None:
        return ArrayRecord({name: Array(np.ascontiguousarray(_as_numpy(v))) for name, v in arrays.items()})
    parts = [_as_numpy(v).reshape(-1) for v in arrays.values()]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=layout.dtype)
    return ArrayRecord({layout.key: Array(np.ascontiguousarray(flat))})


def unpack(record: ArrayRecord, layout: Layout) -> dict[str, np.ndarray]:
    """The named arrays of a packed ``record`` laid out as ``layout``.

    Raises:
        ValueError: the record was packed for another layout, or its vector's size or dtype does not fit (the
            message says which and what was expected).
    """
    if not is_packed(record):
        raise ValueError("the arrays are not packed (expected one Array named fedfusion-packed:<layout>)")
    (key,) = list(record.keys())
    flat = values(record[key])
    if flat.ndim != 1 or flat.size != layout.size or flat.dtype.str != layout.dtype:
        raise ValueError(f"wrong shape: the packed arrays hold {flat.size} values of {flat.dtype} in {flat.ndim} "
                         f"dimension(s); the model has {layout.size} values of {np.dtype(layout.dtype)} in one")
    if key != layout.key:
        raise ValueError(f"the packed arrays follow another model layout ({key[len(PACKED_PREFIX):]}, expected "
                         f"{layout.digest}): a different network or version")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in layout.entries:
        n = math.prod(shape)
        out[name] = flat[offset:offset + n].reshape(shape)
        offset += n
    return out
