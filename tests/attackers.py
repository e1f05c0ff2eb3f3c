"""Attacking sites for the end-to-end robustness test: fedfusion's real ClientApp, with the reply of chosen
simulation partitions corrupted after honest training.

``app`` (``tests.attackers:app``, loaded by Flower's simulation engine through
``simulations.simulate.run_federation(client_app=...)``) trains and evaluates exactly as ``client.client_app``
does; a partition listed in :data:`ATTACKS` then rewrites its train reply:

* ``nan``: one weight becomes NaN;
* ``x1000``: the update is scaled by 1000 (``w_global + 1000 (w_site - w_global)``);
* ``wrong-shape``: the first parameter has a shape the global model does not have (in a packed reply, the vector
  then has the wrong size);
* ``overclaim-flip``: the update is sign-flipped (``w_global - (w_site - w_global)``) and the reply claims
  ``num-examples = cases-<m> = 1e9`` for every modality (in its evaluate replies too).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import client_app as honest
from common import packing, runconfig

#: Simulation partition id -> the attack its replies carry (other partitions are honest).
ATTACKS: dict[int, str] = {4: "nan", 5: "x1000", 6: "wrong-shape", 7: "overclaim-flip"}
#: What the over-claiming site says it has.
CLAIM = 1e9

app = ClientApp()


def _attack(context: Context) -> str | None:
    return ATTACKS.get(int(context.node_config.get("partition-id", -1)))


def _arrays(record: ArrayRecord, layout: packing.Layout | None) -> dict[str, np.ndarray]:
    """The named arrays of a record, unpacked when the server packed them (common/packing.py)."""
    if packing.is_packed(record) and layout is not None:
        return packing.unpack(record, layout)
    return {name: array.numpy() for name, array in record.items()}


def corrupt_train(attack: str, sent: Message, reply: Message, layout: packing.Layout | None = None) -> Message:
    """The train ``reply`` rewritten by ``attack`` (``sent`` carries the global model the round started from; a
    packed model is unpacked with ``layout`` and the corrupted reply packed again, as an honest site replies)."""
    packed = packing.is_packed(sent.content["arrays"])
    glob = _arrays(sent.content["arrays"], layout)
    local = _arrays(reply.content["arrays"], layout)
    metrics = dict(reply.content["metrics"])
    first = next(iter(local))
    if attack == "nan":
        local[first] = local[first].copy()
        local[first].flat[0] = np.nan
    elif attack == "x1000":
        local = {k: (glob[k] + 1000.0 * (v - glob[k])).astype(v.dtype) for k, v in local.items()}
    elif attack == "wrong-shape":
        local[first] = np.zeros(tuple(s + 1 for s in local[first].shape) or (2,), dtype=local[first].dtype)
    elif attack == "overclaim-flip":
        local = {k: (glob[k] - (v - glob[k])).astype(v.dtype) for k, v in local.items()}
        metrics["num-examples"] = CLAIM
        for key in [k for k in metrics if k.startswith("cases-")]:
            metrics[key] = CLAIM
            metrics["has-" + key[len("cases-"):]] = 1.0
    else:
        raise ValueError(f"unknown attack {attack!r}; known: {sorted(set(ATTACKS.values()))}")
    arrays = (packing.pack(local) if packed
              else ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in local.items()}))
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=sent)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Honest training, then the partition's attack (if any) on the reply."""
    reply = honest.train(msg, context)
    attack = _attack(context)
    if attack is None or reply.has_error():
        return reply
    layout = packing.model_layout(runconfig.model_config(runconfig.validate(context.run_config)))
    return corrupt_train(attack, msg, reply, layout)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Honest evaluation; the over-claiming partition claims :data:`CLAIM` cases here too."""
    reply = honest.evaluate(msg, context)
    if _attack(context) != "overclaim-flip" or reply.has_error():
        return reply
    metrics = dict(reply.content["metrics"])
    metrics["num-examples"] = CLAIM
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
