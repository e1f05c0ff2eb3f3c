"""Where a trained model comes from and what it is expected to do: the facts every clinical output states.

A checkpoint sits in a run directory (docs/architecture.md, "Run directory")::

    RUN/config.json            the resolved run config
    RUN/metrics.jsonl          {round, phase, scope, metric, value} lines (models.runlog)
    RUN/checkpoints/best.pt    the checkpoint

:func:`load_provenance` collects, from the checkpoint file and that run directory (when present):

- identity: the checkpoint's SHA-256, fedfusion's version, the run id and where it came from;
- the decision threshold on P(malignant) (``extra["threshold"]`` when the run calibrated one, else 0.5);
- the held-out evaluation of the checkpoint's weights, per modality subset (``server-eval`` rows of a federated
  run, ``central-eval`` rows of a centralized one; keys ``<subset>/<metric>``), with the round it comes from and
  the held-out folder it was measured on;
- the privacy each site spent (the last ``train`` row of each site: ``epsilon-total``, ``delta``, ``dp-enabled``);
- whether the run trained on fedfusion phantoms or on other (real) data.

``fedfusion predict`` puts these into every study's JSON and ``fedfusion export --format monai-bundle`` into the
bundle's metadata and model card; :meth:`ModelProvenance.to_dict` / :meth:`ModelProvenance.from_dict` carry them
between the two.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from common.layout import PHANTOM_GENERATOR, PHANTOM_MANIFEST, VALIDATION_NAME, resolve_test_dir
from models.checkpoint import stored_threshold
from models.metrics import DEFAULT_THRESHOLD
from models.modalities import subset_name
from models.runlog import iter_metrics

__all__ = [
    "DEFAULT_THRESHOLD",
    "EVALUATION_PHASES",
    "ExpectedPerformance",
    "ModelProvenance",
    "SitePrivacy",
    "fedfusion_version",
    "file_sha256",
    "load_provenance",
]

#: Metrics-log phases of held-out evaluations: the ServerApp's per-round one, then centralized training's.
EVALUATION_PHASES: tuple[str, ...] = ("server-eval", "central-eval")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fedfusion_version() -> str:
    """The installed fedfusion distribution's version (``"unknown"`` when run from an uninstalled tree)."""
    try:
        return metadata.version("fedfusion")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class SitePrivacy:
    """Differential privacy one site spent, from its last ``train`` row.

    Attributes:
        site: the site's scope in the metrics log (e.g. ``site-01``).
        round: the last round the site trained in.
        dp: whether the site trained with DP-SGD.
        epsilon: total epsilon spent by then (``None`` when not logged).
        delta: its delta.
    """

    site: str
    round: int
    dp: bool
    epsilon: float | None
    delta: float | None


@dataclass
class ExpectedPerformance:
    """The held-out metrics of one modality subset, as the run measured them.

    Attributes:
        subset: the subset's name (``models.modalities.subset_name``, e.g. ``t1+ct``).
        metrics: ``{metric: value}`` of its row (``dice-whole``, ``accuracy``, ``cases``, ...; ``None`` = undefined).
        round: the round (epoch for a centralized run) the evaluated weights come from.
        phase: the metrics-log phase of the rows.
        heldout: the held-out folder the run evaluated on (``None`` when the run config does not say).
        heldout_role: ``"reporting"``: the set was not used to choose the checkpoint (a separate ``validation/``
            selection set, or no selection); ``"selection"``: ``best.pt`` was chosen on this same set, so these
            numbers are optimistic.
        note: what the numbers are, in a sentence.
    """

    subset: str
    metrics: dict[str, float | None]
    round: int
    phase: str
    heldout: str | None
    heldout_role: str
    note: str


@dataclass
class ModelProvenance:
    """Identity, decision threshold, held-out evaluation and privacy of one checkpoint (see the module doc).

    Attributes:
        checkpoint: the checkpoint file as given.
        sha256: hex SHA-256 of its bytes.
        fedfusion_version: the fedfusion version writing the outputs.
        run_id: the run's id; ``run_id_source`` says where it came from.
        round: the round (epoch) of the checkpoint's weights, ``None`` when it does not say.
        selected_by: the metric ``best.pt`` was chosen by, ``None`` for a checkpoint that was not selected.
        selected_on: the cohort that metric was measured on (``validation``: a separate selection set;
            ``heldout``: the reporting set itself; ``None``: not selected, or a run that did not record it).
        threshold: decision threshold on P(malignant); ``threshold_source`` says where it came from.
        run_dir: the run directory holding ``metrics.jsonl``, ``None`` when there is none next to the checkpoint.
        eval_phase, eval_round: the held-out evaluation used (``None`` when the run logged none).
        evaluation: ``{subset name: {metric: value}}`` of that evaluation (``mean``/``worst``/``all`` rows included).
        heldout: the held-out folder of the run (``None`` when unknown).
        privacy: per-site privacy spent.
        data: what the run trained on, in words (phantom, real, or unknown and why).
        phantom: ``True`` for fedfusion phantoms, ``False`` for other data, ``None`` when unknown.
    """

    checkpoint: str
    sha256: str
    fedfusion_version: str
    run_id: str
    run_id_source: str
    round: int | None
    selected_by: str | None
    threshold: float
    threshold_source: str
    run_dir: str | None = None
    eval_phase: str | None = None
    eval_round: int | None = None
    evaluation: dict[str, dict[str, float | None]] = field(default_factory=dict)
    heldout: str | None = None
    privacy: list[SitePrivacy] = field(default_factory=list)
    data: str = "unknown"
    phantom: bool | None = None
    selected_on: str | None = None

    def expected(self, subset: Sequence[str]) -> ExpectedPerformance | None:
        """The run's held-out metrics for exactly ``subset`` (modality names), ``None`` when not evaluated."""
        name = subset_name(subset)
        row = self.evaluation.get(name)
        if row is None or self.eval_phase is None or self.eval_round is None:
            return None
        what = (f"held-out metrics of the {name} subset (the other modalities masked out) at round {self.eval_round} "
                f"({self.eval_phase})")
        if self.selected_by and self.selected_on != VALIDATION_NAME:
            note = (f"{what}; best.pt was chosen on this same held-out set by {self.selected_by}, so it is also the "
                    "selection set: expect somewhat lower numbers on new studies")
            role = "selection"
        else:
            chosen = (f"best.pt was chosen by {self.selected_by} on a separate {VALIDATION_NAME}/ set"
                      if self.selected_by else "this checkpoint was not selected")
            note = f"{what}; {chosen}, so these numbers are an unbiased estimate for studies like the held-out set's"
            role = "reporting"
        return ExpectedPerformance(name, dict(row), self.eval_round, self.eval_phase, self.heldout, role, note)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (:meth:`from_dict` rebuilds it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelProvenance":
        """Rebuild from :meth:`to_dict` output (e.g. a bundle's metadata)."""
        values = dict(data)
        values["privacy"] = [SitePrivacy(**p) for p in values.get("privacy", [])]
        return cls(**values)


def _run_dir(checkpoint: Path) -> Path | None:
    """The run directory of a checkpoint: the folder above ``checkpoints/``, or the checkpoint's own folder, when it
    holds ``metrics.jsonl``."""
    for candidate in (checkpoint.parent.parent, checkpoint.parent):
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def _run_config(extra: Mapping[str, Any], run_dir: Path | None) -> dict[str, Any]:
    """The run config saved in the checkpoint (federated runs), else ``RUN/config.json``, else empty."""
    saved = extra.get("run_config")
    if isinstance(saved, Mapping):
        return dict(saved)
    if run_dir is not None and (run_dir / "config.json").is_file():
        try:
            loaded = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}
    return {}


def _run_id(checkpoint: Path, extra: Mapping[str, Any], run_config: Mapping[str, Any],
            run_dir: Path | None) -> tuple[str, str]:
    for value, source in ((extra.get("run_id"), "checkpoint extra 'run_id'"),
                          (run_config.get("run-id"), "run config 'run-id'")):
        if value not in (None, ""):
            return str(value), source
    if run_dir is not None:
        return run_dir.resolve().name, "run directory name (the run stores no id)"
    return checkpoint.stem, "checkpoint file name (no run directory next to it)"


def _threshold(extra: Mapping[str, Any]) -> tuple[float, str]:
    value = stored_threshold(extra)
    if value is not None:
        return value, "calibrated on the selection set, stored in the checkpoint"
    return DEFAULT_THRESHOLD, f"default {DEFAULT_THRESHOLD} (the checkpoint stores no calibrated threshold)"


def _heldout(run_config: Mapping[str, Any]) -> str | None:
    if run_config.get("heldout-dir"):  # centralized runs
        return str(run_config["heldout-dir"])
    if "data-dir" in run_config or "test-dir" in run_config:
        return str(resolve_test_dir(str(run_config.get("test-dir", "")), str(run_config.get("data-dir", ""))))
    return None


def _evaluation(records: Sequence[Mapping[str, Any]], wanted_round: int | None
                ) -> tuple[str | None, int | None, dict[str, dict[str, float | None]]]:
    """The held-out evaluation of round ``wanted_round`` when it was evaluated, else of the last evaluated round."""
    for phase in EVALUATION_PHASES:
        rows = [r for r in records if r.get("phase") == phase and r.get("scope") == "global"]
        if not rows:
            continue
        rounds = {int(r["round"]) for r in rows}
        chosen = wanted_round if wanted_round in rounds else max(rounds)
        table: dict[str, dict[str, float | None]] = {}
        for r in rows:
            key = str(r.get("metric", ""))
            if int(r["round"]) != chosen or "/" not in key:
                continue
            subset, metric = key.rsplit("/", 1)
            table.setdefault(subset, {})[metric] = r.get("value")
        return phase, chosen, table
    return None, None, {}


def _privacy(records: Sequence[Mapping[str, Any]]) -> list[SitePrivacy]:
    last: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("phase") != "train" or r.get("scope") in (None, "global"):
            continue
        site, rnd = str(r["scope"]), int(r["round"])
        entry = last.setdefault(site, {"round": rnd})
        if rnd > entry["round"]:
            entry.clear()
            entry["round"] = rnd
        if rnd == entry["round"]:
            entry[str(r.get("metric"))] = r.get("value")
    out = []
    for site in sorted(last):
        e = last[site]
        dp = bool(e.get("dp-enabled")) if e.get("dp-enabled") is not None else e.get("epsilon-total") is not None
        out.append(SitePrivacy(site, int(e["round"]), dp, e.get("epsilon-total"), e.get("delta")))
    return out


def _data_kind(run_config: Mapping[str, Any], heldout: str | None) -> tuple[str, bool | None]:
    """What the run trained on, from the phantom manifest of its data root (or of its held-out set's parent)."""
    roots = [Path(str(run_config[k])) for k in ("data-dir", "data") if run_config.get(k)]
    if heldout:
        roots.append(Path(heldout).parent)
    for root in roots:
        manifest = root / PHANTOM_MANIFEST
        if manifest.is_file():
            try:
                info = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = {}
            if isinstance(info, dict) and info.get("generator") == PHANTOM_GENERATOR:
                return (f"phantom: fedfusion phantoms ({info.get('format')}, scenario {info.get('scenario')}, seed "
                        f"{info.get('seed')}, grid {info.get('shape')}) in {root}"), True
        if root.is_dir():
            return f"real: {root} holds no fedfusion phantom manifest ({PHANTOM_MANIFEST})", False
    if not roots:
        return "unknown: the run config names no data folder", None
    return (f"unknown: the run's data folder ({', '.join(str(r) for r in roots)}) is not reachable from here to tell "
            "phantoms from real data"), None


def load_provenance(checkpoint: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> ModelProvenance:
    """Everything :class:`ModelProvenance` holds for ``checkpoint`` (see the module doc).

    Args:
        checkpoint: a fedfusion checkpoint file.
        extra: its extra state when already loaded (``models.checkpoint.load_checkpoint``); ``None`` loads it.

    Raises:
        FileNotFoundError / ValueError: a missing or foreign checkpoint.
    """
    path = Path(checkpoint)
    if extra is None:
        from models.checkpoint import load_checkpoint

        _, _, extra = load_checkpoint(path)
    extra = dict(extra) if isinstance(extra, Mapping) else {}
    run_dir = _run_dir(path)
    run_config = _run_config(extra, run_dir)
    run_id, run_id_source = _run_id(path, extra, run_config, run_dir)
    threshold, threshold_source = _threshold(extra)
    ckpt_round = extra.get("round", extra.get("epoch"))
    ckpt_round = int(ckpt_round) if isinstance(ckpt_round, (int, float)) and not isinstance(ckpt_round, bool) else None
    selected = extra.get("metric", extra.get("best_metric"))
    records = list(iter_metrics(run_dir / "metrics.jsonl")) if run_dir is not None else []
    phase, eval_round, evaluation = _evaluation(records, ckpt_round)
    heldout = _heldout(run_config)
    data, phantom = _data_kind(run_config, heldout)
    return ModelProvenance(
        checkpoint=str(path), sha256=file_sha256(path), fedfusion_version=fedfusion_version(),
        run_id=run_id, run_id_source=run_id_source, round=ckpt_round,
        selected_by=str(selected) if selected else None, threshold=threshold, threshold_source=threshold_source,
        run_dir=str(run_dir) if run_dir is not None else None, eval_phase=phase, eval_round=eval_round,
        evaluation=evaluation, heldout=heldout, privacy=_privacy(records), data=data, phantom=phantom,
        selected_on=str(extra["selected_on"]) if extra.get("selected_on") else None,
    )
