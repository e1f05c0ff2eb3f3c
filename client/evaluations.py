"""The site's record of what it evaluated, per run: at most one evaluation per received model and per round, none
after the site declined training in the run.

Every evaluate answer is a DP release charged to the ledger, so an adaptive server sending the same (or a crafted)
model again and again could only burn the site's budget; the rate limit stops it earlier and makes the burn rate
one release per round. A deployed SuperNode starts a new ClientApp process per message, so the record lives in the
state directory (``evaluations.json``, written atomically) and the check reads it every time. The model is named
by a SHA-256 digest of its arrays (:func:`model_digest`); the round by the message's ``server-round``.

A slot is claimed *before* anything is computed: a crash mid-evaluation uses the slot up (fail closed), it never
frees it for a second try. An unreadable record refuses evaluation until an operator fixes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common import replies
from models.atomic import atomic_write_text

from .site import SiteDecline

log = logging.getLogger("fedfusion.site")

__all__ = ["EVALUATIONS_FILE", "EvaluationBook", "model_digest"]

#: File name of the record inside a site's state directory.
EVALUATIONS_FILE = "evaluations.json"
_FORMAT = "fedfusion-evaluations/1"


def model_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class EvaluationBook:
    """What the site evaluated and whether it declined training, per run id (see the module docstring)."""

    path: Path
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path) -> "EvaluationBook":
        """The record of ``state_dir`` (empty when none was written yet).

        Raises:
            SiteDecline(REFUSED_EVALUATION): the file exists but cannot be read.
        """
        path = Path(state_dir) / EVALUATIONS_FILE
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != _FORMAT or not isinstance(data.get("runs"), dict):
                raise ValueError(f"unexpected format {data.get('format')!r}")
            return cls(path, {str(k): dict(v) for k, v in data["runs"].items()})
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.error("evaluation record %s is unreadable (%s); evaluation refused until it is restored", path, exc)
            raise SiteDecline(replies.REFUSED_EVALUATION,
                              "the site's evaluation record is unreadable; the site operator must restore it") from exc

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"format": _FORMAT, "runs": self.runs}, indent=1))

    def _run(self, run_id: str) -> dict[str, Any]:
        return self.runs.setdefault(str(run_id), {"declined-training": False, "evaluated": []})

    def note_training_declined(self, run_id: str) -> None:
        """Remember that the site declined training in ``run_id`` (saved)."""
        self._run(run_id)["declined-training"] = True
        self.save()

    def claim(self, run_id: str, server_round: int, digest: str) -> None:
        """Take the evaluation slot of ``(run_id, server_round, digest)`` (saved before returning).

        Raises:
            SiteDecline(REFUSED_EVALUATION): the site declined training in this run, or already evaluated this
                round or this model in it.
        """
        run = self._run(run_id)
        if run.get("declined-training"):
            raise SiteDecline(replies.REFUSED_EVALUATION,
                              "the site declined training in this run and answers no evaluation in it")
        done = run.get("evaluated", [])
        if any(int(e.get("round", -1)) == int(server_round) for e in done):
            raise SiteDecline(replies.REFUSED_EVALUATION, "the site already evaluated a model in this round",
                              server_round=server_round)
        if any(e.get("model") == digest for e in done):
            raise SiteDecline(replies.REFUSED_EVALUATION, "the site already evaluated this model in this run",
                              server_round=server_round)
        done.append({"round": int(server_round), "model": digest})
        run["evaluated"] = done
        self.save()
