#!/usr/bin/env bash
# The main job: install fedfusion, generate phantom hospital sites, pretrain on a generated public cohort (another
# seed and scanners), then run a federated simulation with patient-level differential privacy (epsilon 8 per site)
# and missing modalities that fine-tunes the heads privately, and write a report to runs/demo/report.md.
# Why the heads: at ~24 patients per site DP-SGD's noise drowns the gradient of anything larger (fedfusion
# privacy-plan; docs/results.md, privacy); the report's round 0 is the public model the sites start from.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/fedfusion simulate --out runs/demo --set dp-trainable=head "$@"
