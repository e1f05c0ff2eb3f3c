#!/usr/bin/env bash
# The main job: install fedfusion, generate phantom hospital sites, run a federated simulation with
# differential privacy and missing modalities, and write a report to runs/demo/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/fedfusion simulate --out runs/demo "$@"
