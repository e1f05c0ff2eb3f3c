"""fedfusion's Flower ClientApp (Message API): ``train``, ``evaluate`` and ``query.prepare`` handlers.

Replies hold only an ``ArrayRecord`` ``"arrays"`` (the plain network's state dict, the server's parameter names;
only the run's trainable set, run config ``dp-trainable``; packed into one vector when the server sent the model
packed, :mod:`common.packing`) and a ``MetricRecord`` ``"metrics"`` of numbers. Train metrics: ``num-examples``
(training cases, rounded up to the
site's ``count-granularity``), ``site-index``, ``train-seconds``, ``cases-<modality>`` (rounded alike) and
``has-<modality>`` for every modality of :data:`models.modalities.MODALITIES`, ``dp-enabled``, ``epsilon-total``,
``epsilon-round``, ``delta``, ``noise-multiplier``, ``max-grad-norm``. Evaluate metrics: ``num-examples`` (held-out
cases, rounded), ``site-index``, ``eval-noise-multiplier``, ``epsilon-total``, ``epsilon-round``, ``delta`` and the
Gaussian-noised statistics of :mod:`common.evalstats` (``stat-*``) over the site's held-out patients. Prepare
(sent by the ServerApp before round 1, :mod:`client.prepare`): ``ready`` and ``can-evaluate`` only.

When the site does not train (privacy budget exhausted, run config weaker than the site's policy, no usable
case, arrays that do not fit the run's model) or does not evaluate (see :func:`client.task.evaluate_round`) it
answers with an *error* reply whose code is one of
:mod:`common.replies` and whose reason is a short plain-text message with numbers only. Flower's strategies drop
error replies before aggregation, so a declining site never disturbs a round.

The same app runs in simulation (node config ``partition-id``) and in a deployed SuperNode (node config
``data-dir``/``state-dir``); see :mod:`client.task` and docs/site.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import packing, replies, timings

log = logging.getLogger("fedfusion.site")

app = ClientApp()


def _round_of(msg: Message) -> int:
    """Server round from the config record (``server-round``), else the message group id, else 0."""
    try:
        cfg = msg.content.config_records.get("config")
        if cfg is not None and "server-round" in cfg:
            return int(cfg["server-round"])
    except Exception:  # noqa: BLE001 - a malformed config only loses the round number (used for seeding)
        pass
    gid = msg.metadata.group_id
    return int(gid) if gid.isdigit() else 0


def _received_record(msg: Message) -> ArrayRecord:
    records = msg.content.array_records
    if not records:
        raise _decline(replies.BAD_REQUEST, "the message carries no arrays (expected an ArrayRecord 'arrays')")
    return records["arrays"] if "arrays" in records else next(iter(records.values()))


def _received_state(msg: Message, context: Context) -> dict[str, Any]:
    """The received model's state dict (named CPU tensors); a packed vector (:mod:`common.packing`) is laid out as
    the run config's network."""
    record = _received_record(msg)
    if not packing.is_packed(record):
        return record.to_torch_state_dict()
    import torch

    from common import runconfig

    try:
        layout = packing.model_layout(runconfig.model_config(runconfig.validate(context.run_config)))
        if layout is None:
            raise ValueError("the run's network has arrays of several dtypes and is never sent packed")
        arrays = packing.unpack(record, layout)
    except ValueError as exc:  # includes RunConfigError
        raise _decline(replies.BAD_REQUEST, f"the received arrays do not fit the run's model: {exc}") from exc
    return {name: torch.from_numpy(np.array(value)) for name, value in arrays.items()}


def _reply_arrays(msg: Message, state: dict[str, Any]) -> ArrayRecord:
    """The new state as the server sent the model: packed when it came packed, else one Array per name."""
    return packing.pack(state) if packing.is_packed(_received_record(msg)) else ArrayRecord(state)


def _decline(code: int, text: str) -> Exception:
    from client.site import SiteDecline

    return SiteDecline(code, text)


def _error_reply(msg: Message, exc: BaseException) -> Message:
    from client.site import SiteDecline

    if isinstance(exc, SiteDecline):
        code, reason = exc.code, exc.reason
    else:
        # Log the full traceback locally (it may name local files); send only the exception type.
        log.exception("site failed to handle a %s message", msg.metadata.message_type)
        code = replies.SITE_FAILURE
        reason = replies.make_reason(code, f"the site failed ({type(exc).__name__}); see the site's log")
    log.error("site replies with error %d: %s", code, reason)
    return Message(error=Error(code=code, reason=reason), reply_to=msg)


def _who(context: Context) -> str:
    """The site's name in timing records (:mod:`common.timings`): its folder name, or the simulation partition."""
    data_dir = str(context.node_config.get("data-dir", "") or "")
    return Path(data_dir).name if data_dir else f"partition-{context.node_config.get('partition-id', '?')}"


def _import_task(who: str) -> None:
    """Import :mod:`client.task` (torch, Opacus, MONAI: the largest start-up cost of a fresh ClientApp process),
    timed as phase ``import`` the first time in this process."""
    if "client.task" in sys.modules:
        return
    with timings.phase(who, "import"):
        import client.task  # noqa: F401


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on local cases with DP-SGD; reply with new arrays and metrics."""
    who, rnd = _who(context), _round_of(msg)
    with timings.phase(who, "train-message", round=rnd) as timing:
        try:
            _import_task(who)
            from client.task import train_round

            state = _received_state(msg, context)
            new_state, metrics = train_round(context.node_config, context.run_config, state, rnd, str(context.run_id))
            timing["compute"] = metrics.get("train-seconds", 0.0)
            content = RecordDict({"arrays": _reply_arrays(msg, new_state), "metrics": MetricRecord(metrics)})
            return Message(content=content, reply_to=msg)
        except Exception as exc:  # noqa: BLE001 - a site daemon must answer, never crash
            _remember_decline(context, exc)
            return _error_reply(msg, exc)


def _remember_decline(context: Context, exc: BaseException) -> None:
    """A site that declines training in a run (budget, policy) answers no evaluation in that run either."""
    from client.site import SiteDecline

    if isinstance(exc, SiteDecline) and replies.is_decline(exc.code):
        from client.task import note_training_declined

        try:
            note_training_declined(context.node_config, context.run_config, str(context.run_id))
        except Exception:  # noqa: BLE001 - the decline reply must still go out (an unwritable state dir fails evaluation too)
            log.exception("could not record the training decline in the site's state")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on held-out patients; reply with DP-noised statistics only."""
    who, rnd = _who(context), _round_of(msg)
    with timings.phase(who, "evaluate-message", round=rnd):
        try:
            _import_task(who)
            from client.task import evaluate_round

            state = _received_state(msg, context)
            metrics = evaluate_round(context.node_config, context.run_config, state, rnd, str(context.run_id))
            return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
        except Exception as exc:  # noqa: BLE001 - a site daemon must answer, never crash
            return _error_reply(msg, exc)


@app.query("prepare")
def prepare(msg: Message, context: Context) -> Message:
    """Build what the first round needs (imports, data, network, DP engine) before it starts; reply ``ready``."""
    who = _who(context)
    with timings.phase(who, "prepare-message"):
        try:
            _import_task(who)
            from client.prepare import prepare_site

            metrics = prepare_site(context.node_config, context.run_config)
            return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
        except Exception as exc:  # noqa: BLE001 - a site daemon must answer, never crash
            return _error_reply(msg, exc)
