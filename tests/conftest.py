"""Shared pytest set-up: offline, quiet, deterministic, and sized for a 2-core machine."""

from __future__ import annotations

import os

# Flower's telemetry would try the network at import time; tests (and CI) are offline.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
