"""The model card (``docs/README.md``) of an exported MONAI bundle: what the model is, what it was trained on
(phantoms or real data), the privacy each site spent, the held-out metrics per modality subset, and how to run it."""

from __future__ import annotations

from common.provenance import ModelProvenance
from models.config import CLASS_NAMES, SEG_LABELS, ModelConfig
from models.modalities import subset_name, subsets

#: Metrics shown per subset, in this order, when the run logged them.
CARD_METRICS: tuple[str, ...] = ("cases", "dice-whole", "dice-core", "dice-enhancing", "hd95-whole", "accuracy",
                                 "auroc", "f1")


def _fmt(value: object, count: bool = False) -> str:
    """A metric cell: ``n/a`` when undefined, whole numbers for counts, 3 decimals (scientific below 0.001)."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)):
        v = float(value)
        if count:
            return f"{v:.0f}"
        return f"{v:.1e}" if v != 0.0 and abs(v) < 1e-3 else f"{v:.3f}"
    return str(value)


def _metrics_table(provenance: ModelProvenance, cfg: ModelConfig) -> list[str]:
    if not provenance.evaluation:
        return ["The run logged no held-out evaluation (no `metrics.jsonl` with `server-eval`/`central-eval` rows next "
                "to the checkpoint).", ""]
    names = [subset_name(s) for s in subsets(cfg.modalities)] + ["mean", "worst"]
    rows = [n for n in names if n in provenance.evaluation]
    shown = [m for m in CARD_METRICS if any(m in provenance.evaluation[r] for r in rows)]
    lines = [
        f"Held-out metrics of round {provenance.eval_round} ({provenance.eval_phase}) on "
        f"`{provenance.heldout or 'the run held-out set'}`, one row per modality subset (the other modalities masked "
        "out). This is the run's only held-out set, the one the best checkpoint was selected on, so the numbers are "
        "optimistic for new data.",
        "",
        "| subset | " + " | ".join(shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(_fmt(provenance.evaluation[r].get(m), m == "cases") for m in shown) + " |")
    return [*lines, ""]


def _privacy_table(provenance: ModelProvenance) -> list[str]:
    if not provenance.privacy:
        return ["No site training rows in the run's metrics log: the privacy spent is not recorded.", ""]
    lines = ["Patient-level differential privacy (DP-SGD) spent by each site over the whole run:", "",
             "| site | last round | DP | epsilon | delta |", "|---|---|---|---|---|"]
    for p in provenance.privacy:
        lines.append(f"| {p.site} | {p.round} | {'yes' if p.dp else 'no'} | "
                     f"{_fmt(p.epsilon) if p.dp else 'not private'} | {_fmt(p.delta) if p.dp else '-'} |")
    return [*lines, ""]


def model_card(cfg: ModelConfig, provenance: ModelProvenance, bundle_name: str) -> str:
    """The bundle's ``docs/README.md`` (Markdown)."""
    labels = ", ".join(f"{k} {v}" for k, v in SEG_LABELS.items())
    lines = [
        f"# {bundle_name}: fedfusion {cfg.family} fusion network",
        "",
        "Segments brain tumour sub-regions and estimates P(malignant) from any subset of "
        f"{', '.join(cfg.modalities)}, trained federatedly with fedfusion. Research use only; not a medical device.",
        "",
        "## Model",
        "",
        f"- fusion family `{cfg.family}`, encoder widths {list(cfg.channels)}, input grid {list(cfg.spatial_size)} "
        "(every study is resampled to it as in training and the output is mapped back to the study's own grid)",
        f"- inputs: `image` ({len(cfg.modalities)} channels: {', '.join(cfg.modalities)}; a missing modality is zeros) "
        "and `mask` (1 = modality present)",
        f"- outputs: segmentation ({labels}) and class ({', '.join(CLASS_NAMES)})",
        f"- decision threshold on P(malignant): {provenance.threshold:g} ({provenance.threshold_source})",
        "",
        "## Training data",
        "",
        f"{provenance.data}.",
        "",
        "## Privacy",
        "",
        *_privacy_table(provenance),
        "## Held-out performance per modality subset",
        "",
        *_metrics_table(provenance, cfg),
        "## Provenance",
        "",
        f"- fedfusion {provenance.fedfusion_version}; run `{provenance.run_id}` ({provenance.run_id_source})",
        f"- checkpoint `{provenance.checkpoint}`, round {provenance.round}, SHA-256 `{provenance.sha256}`"
        + (f", selected by {provenance.selected_by}" if provenance.selected_by else ""),
        "",
        "## Running it",
        "",
        "Needs fedfusion installed (the network and the readers are fedfusion's). For a study folder (DICOM series "
        "and/or `<id>_<modality>.nii.gz` files) or a folder of them:",
        "",
        "```bash",
        "python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\",
        "    --bundle_root . --dataset_dir STUDIES --output_dir OUT",
        "```",
        "",
        "Per study it writes `OUT/<study>/<study>_seg.nii.gz` (on the study's own grid), `<study>_seg.dcm` (DICOM "
        "Segmentation, DICOM input only) and `<study>_prediction.json`, as `fedfusion predict` does; the weights alone "
        "load with `monai.bundle.load(name, bundle_dir=..., workflow_type=\"inference\")`.",
        "",
    ]
    return "\n".join(lines)
