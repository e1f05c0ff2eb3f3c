"""Where a federation's data lives on disk: the one place for the folder rules.

```
DATA/                 a data root (``fedfusion phantoms --out DATA``, or a consortium's own folders)
  site-01/            a site: labels.csv + one folder per case (the folder name is the site-local case id)
  site-02/ ...
  heldout/            the held-out set the reported numbers come from, same layout as a site (never a training site)
  validation/         the server's model-selection set (checkpoints/best.pt is chosen on it; optional)
  heldout-unseen/     a held-out cohort from a scanner vendor no training site has (optional)
RUN/site-state/site-01/   a simulated site's private state (privacy ledger, policy, caches)
DATA/.fedfusion-cache/site-01/   what simulations derive from a site once per data set (preprocessed cases)
```

In a simulation, Flower's partition ``i`` is the ``i``-th ``site-*`` folder in name order (:func:`partition_site`);
a deployed site names its own folder in its node config.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "COHORT_NAMES",
    "HELDOUT_NAME",
    "LABELS_FILE",
    "PHANTOM_GENERATOR",
    "PHANTOM_MANIFEST",
    "SITE_PREFIX",
    "SITE_SETTINGS_FILE",
    "SITE_STATE",
    "UNSEEN_NAME",
    "VALIDATION_NAME",
    "DERIVED_CACHE",
    "derived_cache_dir",
    "heldout_dir",
    "partition_site",
    "resolve_cohort_dir",
    "resolve_test_dir",
    "simulated_state_dir",
    "site_dirs",
]

#: Per-site label file: ``case_id,label`` (0 benign / 1 malignant).
LABELS_FILE = "labels.csv"
#: Optional per-site settings, in the site folder (e.g. ``convention = "brats2021"``; see common/data/site_settings.py).
SITE_SETTINGS_FILE = "fedfusion-site.toml"
#: Folder-name prefix of a training site inside a data root.
SITE_PREFIX = "site-"
#: Folder name of the held-out test set the reported numbers come from, inside a data root.
HELDOUT_NAME = "heldout"
#: Folder name of the server's model-selection set (``best.pt``), inside a data root.
VALIDATION_NAME = "validation"
#: Folder name of the held-out cohort from a scanner no training site has, inside a data root.
UNSEEN_NAME = "heldout-unseen"
#: The cohorts of a data root that are never training sites, in report order.
COHORT_NAMES: tuple[str, ...] = (HELDOUT_NAME, VALIDATION_NAME, UNSEEN_NAME)
#: Folder of the simulated sites' private state inside a run directory.
SITE_STATE = "site-state"
#: Folder of a data root holding what is derived from its folders once per data set (preprocessed cases of the
#: simulated sites and of the held-out set), shared by every simulation over that data.
DERIVED_CACHE = ".fedfusion-cache"
#: Manifest ``fedfusion phantoms`` writes into a data root it generated, and its ``generator`` value: how anything
#: (e.g. a model card) tells phantom data from real data.
PHANTOM_MANIFEST = "phantoms.json"
PHANTOM_GENERATOR = "fedfusion phantoms"


def site_dirs(data_root: str | Path) -> list[Path]:
    """The training site folders of a data root (``site-*``, sorted by name; the held-out set is not a site).

    Raises:
        FileNotFoundError: when ``data_root`` holds no site folder, saying how to make one.
    """
    root = Path(data_root)
    sites = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(SITE_PREFIX)) if root.is_dir() else []
    if not sites:
        raise FileNotFoundError(
            f"{root} holds no {SITE_PREFIX}* folders; generate phantoms with `fedfusion phantoms --out {root}` or "
            "point the data directory at a folder of sites"
        )
    return sites


def partition_site(data_root: str | Path, partition_id: int) -> Path:
    """The site folder of simulation partition ``partition_id`` (the ``partition_id``-th of :func:`site_dirs`).

    Raises:
        FileNotFoundError: no site folders; ValueError: fewer site folders than the partition needs.
    """
    sites = site_dirs(data_root)
    if not 0 <= partition_id < len(sites):
        raise ValueError(
            f"simulation partition {partition_id} has no site folder ({data_root} holds {len(sites)} "
            f"{SITE_PREFIX}* folders); make num-supernodes match the number of sites"
        )
    return sites[partition_id]


def heldout_dir(data_root: str | Path) -> Path:
    """The held-out set of a data root (it may not exist)."""
    return Path(data_root) / HELDOUT_NAME


def resolve_test_dir(test_dir: str | Path, data_dir: str | Path) -> Path:
    """Run config ``test-dir`` if set, else the held-out set of ``data-dir``."""
    return Path(test_dir) if str(test_dir).strip() else heldout_dir(data_dir)


def resolve_cohort_dir(given: str | Path, data_dir: str | Path, name: str) -> Path | None:
    """A run config's folder for cohort ``name`` (``select-dir``, ``unseen-dir``): the given folder, else
    ``<data-dir>/<name>`` when it exists, else ``None`` (the cohort is optional)."""
    if str(given).strip():
        return Path(given)
    candidate = Path(data_dir) / name
    return candidate if candidate.is_dir() else None


def simulated_state_dir(run_dir: str | Path, site_name: str) -> Path:
    """A simulated site's private state directory inside its run directory."""
    return Path(run_dir) / SITE_STATE / site_name


def derived_cache_dir(folder: str | Path) -> Path | None:
    """Where a site or held-out folder of a data root keeps what is derived from it once per data set
    (``<data-root>/.fedfusion-cache/<folder name>``), or ``None`` when the data root is not writable (the caller
    then keeps its cache per run)."""
    folder = Path(folder)
    cache = folder.parent / DERIVED_CACHE / folder.name
    if cache.is_dir() or os.access(folder.parent, os.W_OK):
        return cache
    return None
