"""A compact per-round console table of the global model (rich).

Columns: round, all-modality Dice per region, accuracy, AUROC, and the mean and worst subset whole-lesion Dice.
Reads the flat metric names of ``models.evaluation.SubsetReport.to_flat`` (``all/dice-whole``, ``mean/...``,
``worst/...``); a missing metric shows as ``-``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

from rich.console import Console
from rich.table import Table

from models.config import SEG_REGIONS

COLUMNS: list[tuple[str, str]] = (
    [(f"Dice {region}", f"all/dice-{region}") for region in SEG_REGIONS]
    + [("acc", "all/accuracy"), ("AUROC", "all/auroc"), ("mean Dice", "mean/dice-whole"),
       ("worst Dice", "worst/dice-whole")]
)


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(float(value)):
        return "-"
    return f"{float(value):.3f}"


def round_table(server_round: int, flat: Mapping[str, float], title: str | None = None) -> Table:
    """One-row rich table of a round's global evaluation."""
    table = Table(title=title or f"global model, round {server_round}", title_justify="left", box=None)
    table.add_column("round", justify="right")
    for header, _ in COLUMNS:
        table.add_column(header, justify="right")
    table.add_row(str(server_round), *[_fmt(flat.get(key)) for _, key in COLUMNS])
    return table


def render(renderable: object, width: int = 120) -> str:
    """Render a rich renderable (or pass a string through) to plain text, for log files."""
    if isinstance(renderable, str):
        return renderable
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(renderable)
    return buf.getvalue()


def print_round(server_round: int, flat: Mapping[str, float], console: Console | None = None) -> None:
    """Print the compact table of a round to the console."""
    (console or Console()).print(round_table(server_round, flat))
