"""Print docs/site.md's planner table: `fedfusion privacy-plan`'s noise and verdict for the run config's defaults, 3
sites, by cases per site, epsilon and `dp-trainable` (the same `client.privacy.planner.plan` the command calls):
`all` from scratch, `shared` and `head` from a supervised pretrained start (`init-checkpoint`; the name given here
is no file, which the planner plans as a trained start), the start where training part of the network makes sense.

    .venv/bin/python scripts/planner_table.py
"""

from __future__ import annotations

from client.privacy.planner import KEEPS_GAIN_UNTESTED, KEEPS_NO_GAIN, LEARNS, plan

CASES = (24, 64, 128, 256)
EPSILONS = (1.0, 3.0, 8.0)
TRAINABLE = ("all", "shared", "head")
#: Table marks of the verdicts.
MARKS = {LEARNS: "✓", KEEPS_NO_GAIN: "=", KEEPS_GAIN_UNTESTED: "?"}


def main() -> None:
    dims: dict[str, int] = {}
    rows = ["| cases per site | ε | σ | q | all | shared | head |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in CASES:
        for eps in EPSILONS:
            cells: list[str] = []
            for trainable in TRAINABLE:
                start = {} if trainable == "all" else {"init-checkpoint": "public.pt"}
                p = plan({"dp-enabled": True, "dp-target-epsilon": eps, "dp-noise-multiplier": 0.0,
                          "dp-trainable": trainable, **start}, patients=n, sites=3)
                dims[trainable] = p.dimension
                if not cells:
                    cells = [f"{p.noise.noise_multiplier:.2f}", f"{p.noise.sample_rate:.2f}"]
                cells.append(f"{p.run_ratio:.2g} {MARKS.get(p.verdict, '✗')}")
            rows.append(f"| {n} | {eps:g} | " + " | ".join(cells) + " |")
    print("d = " + ", ".join(f"{d:,} for `{t}`" for t, d in dims.items()))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
