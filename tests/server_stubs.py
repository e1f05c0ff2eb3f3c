"""Test doubles for the server: hand-made replies, an in-process Grid, and a lightweight stub site.

The in-process :class:`LocalGrid` delivers each message to a Python callable (the stub site) synchronously, so a
real :func:`server.server_app.run_server` can run in a plain subprocess that a test can kill.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from models.modalities import MODALITIES


def reply(node_id: int, arrays: Mapping[str, np.ndarray] | None, metrics: Mapping[str, float],
          message_type: str = MessageType.TRAIN) -> Message:
    """A reply Message from ``node_id`` carrying ``arrays`` (if given) and ``metrics``."""
    content: dict[str, Any] = {"metrics": MetricRecord(dict(metrics))}
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    meta = Metadata(run_id=1, message_id="", src_node_id=node_id, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content=RecordDict(content), metadata=meta)


def site_metrics(num_examples: float, cases: Mapping[str, float]) -> dict[str, float]:
    """Train metrics as fedfusion's ClientApp sends them (``cases-``/``has-`` for every modality)."""
    out = {"num-examples": float(num_examples), "train-seconds": 1.0}
    for m in MODALITIES:
        c = float(cases.get(m, 0.0))
        out[f"cases-{m}"] = c
        out[f"has-{m}"] = 1.0 if c > 0 else 0.0
    return out


def eval_metrics(patients: int, dice: float, **extra: float) -> dict[str, float]:
    """Evaluate-reply metrics as fedfusion's ClientApp sends them, without the noise: the statistics
    (:mod:`common.evalstats`) of ``patients`` held-out patients (one study each, benign, probability 0.3) whose Dice
    is ``dice`` in every region, the case count rounded up to the sites' default granularity of 10; plus ``extra``
    metrics."""
    from common.evalstats import STATISTIC_KEYS, site_sums
    from models.metrics import REGIONS

    sums = site_sums(np.full((patients, len(REGIONS)), dice), np.full(patients, 0.3), np.zeros(patients, dtype=int),
                     [[i] for i in range(patients)])
    return {"num-examples": float(-(-patients // 10) * 10), **{k: float(v) for k, v in zip(STATISTIC_KEYS, sums)},
            **extra}


def set_task_identity() -> None:
    """Flower's Message constructor needs a task identity in the ServerApp process."""
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0


class LocalGrid(Grid):
    """A Grid whose nodes are Python callables ``site(node_id, message) -> reply Message``."""

    def __init__(self, node_ids: Iterable[int], site: Callable[[int, Message], Message]) -> None:
        set_task_identity()
        self.node_ids = list(node_ids)
        self.site = site
        self._run: Any = None
        self._pending: dict[str, Message] = {}
        self._count = 0

    def set_run(self, run: Any) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Any:  # noqa: D102
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # noqa: D102
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> list[int]:  # noqa: D102
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:  # noqa: D102
        ids = []
        for msg in messages:
            self._count += 1
            mid = f"m{self._count}"
            self._pending[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:  # noqa: D102
        out = []
        for mid in list(message_ids):
            msg = self._pending.pop(mid, None)
            if msg is None:  # pulled before: a real grid returns each reply once
                continue
            reply = self.site(int(msg.metadata.dst_node_id), msg)
            # as the SuperLink does: a reply names the message it answers (PromptGrid matches them by it)
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


class FakeGrid(LocalGrid):
    """A grid for unit tests that only samples (never sends)."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        super().__init__(node_ids, lambda n, m: m)


def write_heldout(path: "Path | str", modalities: Iterable[str], n_cases: int = 4,
                  shape: tuple[int, int, int] = (8, 16, 16), seed: int = 0) -> "Path":
    """A tiny BraTS-layout held-out folder: ``case-000i/case-000i_<m>.nii.gz`` + ``_seg`` + labels.csv."""
    from pathlib import Path

    import nibabel as nib

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(n_cases):
        cid = f"case-{i + 1:04d}"
        case = root / cid
        case.mkdir(exist_ok=True)
        seg = np.zeros(shape, dtype=np.uint8)
        c = [s // 2 for s in shape]
        seg[c[0] - 2:c[0] + 2, c[1] - 4:c[1] + 4, c[2] - 4:c[2] + 4] = 1
        seg[c[0] - 1:c[0] + 1, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] = 2 + (i % 2)
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        for m in modalities:
            img = (rng.standard_normal(shape) + seg).astype(np.float32)
            nib.save(nib.Nifti1Image(img, affine), case / f"{cid}_{m}.nii.gz")
        nib.save(nib.Nifti1Image(seg, affine), case / f"{cid}_seg.nii.gz")
        labels.append(f"{cid},{i % 2}")
    (root / "labels.csv").write_text("case_id,label\n" + "\n".join(labels) + "\n")
    return root
