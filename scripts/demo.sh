#!/usr/bin/env bash
# The main job: install fedfusion, generate phantom hospital sites, pretrain on a generated public cohort that is
# MRI only (another seed and scanners; public brain-tumour data such as BraTS have no CT or ultrasound), then run a
# federated simulation with patient-level differential privacy (epsilon 8 per site) and missing modalities, and
# write a report to runs/demo/report.md.
# What the sites train privately: the heads, and the CT and ultrasound encoders that no public data could train
# (dp-trainable = head+ct+us), the heads at a tenth of the learning rate (lr-base-scale = 0.1: they are the public
# model's, the CT and US encoders are new), each patient's gradient averaged over 4 augmented views before clipping
# (augment-multiplicity = 4: more signal per clipped gradient at no privacy cost). Everything else stays the public
# model's: at ~24 patients per site DP-SGD's noise drowns the gradient of a larger part (fedfusion privacy-plan;
# docs/results.md, privacy). The report's round 0 is the public model, which cannot segment from CT or ultrasound
# alone; the rounds show the sites teaching it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/fedfusion simulate --out runs/demo --public-modalities t1,t1ce,t2,flair \
    --set dp-trainable=head+ct+us --set lr-base-scale=0.1 --set augment-multiplicity=4 "$@"
