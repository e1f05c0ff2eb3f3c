"""fedfusion's Flower ClientApp (Message API): ``train`` and ``evaluate`` handlers.

Replies hold only an ``ArrayRecord`` ``"arrays"`` (the plain network's state dict, the server's parameter names;
only the run's trainable set, run config ``dp-trainable``)
and a ``MetricRecord`` ``"metrics"`` of numbers. Train metrics: ``num-examples`` (training cases, rounded up to the
site's ``count-granularity``), ``site-index``, ``train-seconds``, ``cases-<modality>`` (rounded alike) and
``has-<modality>`` for every modality of :data:`models.modalities.MODALITIES`, ``dp-enabled``, ``epsilon-total``,
``epsilon-round``, ``delta``, ``noise-multiplier``, ``max-grad-norm``. Evaluate metrics: ``num-examples`` (held-out
cases, rounded), ``site-index``, ``eval-noise-multiplier``, ``epsilon-total``, ``epsilon-round``, ``delta`` and the
Gaussian-noised statistics of :mod:`common.evalstats` (``stat-*``) over the site's held-out patients.

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
from typing import Any

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import replies

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


def _received_state(msg: Message) -> dict[str, Any]:
    records = msg.content.array_records
    if not records:
        raise _decline(replies.BAD_REQUEST, "the message carries no arrays (expected an ArrayRecord 'arrays')")
    record = records["arrays"] if "arrays" in records else next(iter(records.values()))
    return record.to_torch_state_dict()


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on local cases with DP-SGD; reply with new arrays and metrics."""
    try:
        from client.task import train_round

        state = _received_state(msg)
        new_state, metrics = train_round(context.node_config, context.run_config, state, _round_of(msg),
                                         str(context.run_id))
        content = RecordDict({"arrays": ArrayRecord(new_state), "metrics": MetricRecord(metrics)})
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
    try:
        from client.task import evaluate_round

        state = _received_state(msg)
        metrics = evaluate_round(context.node_config, context.run_config, state, _round_of(msg), str(context.run_id))
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - a site daemon must answer, never crash
        return _error_reply(msg, exc)
