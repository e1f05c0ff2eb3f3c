"""Which of a site's patients train and which are held out to evaluate the federation's models.

Evaluation answers must never come from cases the site trains on (an evaluate reply about training cases tells
the server how well its model fits exactly the patients DP-SGD protects, outside the training guarantee), so the
site splits its *patients* (all studies of a patient on one side, :meth:`common.data.CaseDataset.patient_groups`):

* size: ``round(VALIDATION_FRACTION * patients)`` patients (20 %), at most :data:`MAX_VALIDATION_PATIENTS`; a site
  with fewer than :data:`MIN_PATIENTS_FOR_VALIDATION` patients holds none out (it trains on every patient and
  declines to evaluate: a handful of patients gives no useful metric once noised, and each held-out patient is
  one fewer to train on). The smallest validation set is therefore 2 patients (20 % of 10).
* which: the patients with the smallest keyed hash (HMAC-SHA256 under the site's secret salt,
  :func:`client.site.site_salt`, of the patient's key) - the same in every process and every round for the same
  cases, and unpredictable to anyone without the site's state directory (the server cannot aim crafted models at
  the held-out patients). Adding patients later can move a held-out patient into training (never the reverse
  within one set of cases); evaluation then still only reads held-out patients of the current split.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_VALIDATION_PATIENTS", "MIN_PATIENTS_FOR_VALIDATION", "SiteSplit", "VALIDATION_FRACTION",
           "split_site", "validation_size"]

#: Share of a site's patients held out for evaluation.
VALIDATION_FRACTION = 0.2
#: Sites with fewer patients hold none out (and decline evaluation).
MIN_PATIENTS_FOR_VALIDATION = 10
#: Most patients held out, however large the site.
MAX_VALIDATION_PATIENTS = 100


@dataclass(frozen=True)
class SiteSplit:
    """A site's patients split into training and validation.

    Attributes:
        train_groups: dataset indices of each training patient's studies.
        validation_groups: dataset indices of each held-out patient's studies (empty for small sites).
    """

    train_groups: tuple[tuple[int, ...], ...]
    validation_groups: tuple[tuple[int, ...], ...]

    @property
    def train(self) -> list[int]:
        """Training dataset indices, ascending."""
        return sorted(i for g in self.train_groups for i in g)

    @property
    def validation(self) -> list[int]:
        """Validation dataset indices, ascending."""
        return sorted(i for g in self.validation_groups for i in g)

    def groups_within(self, indices: list[int], groups: tuple[tuple[int, ...], ...]) -> list[list[int]]:
        """``groups`` as positions in ``indices`` (the subset a loader iterates over)."""
        position = {i: k for k, i in enumerate(indices)}
        return [[position[i] for i in g] for g in groups]

    def train_positions(self) -> list[list[int]]:
        """Each training patient's studies as positions in :attr:`train` (what patient-level DP-SGD samples)."""
        return self.groups_within(self.train, self.train_groups)

    def validation_positions(self) -> list[list[int]]:
        """Each held-out patient's studies as positions in :attr:`validation`."""
        return self.groups_within(self.validation, self.validation_groups)


def validation_size(num_patients: int) -> int:
    """Patients to hold out of ``num_patients`` (see the module docstring)."""
    if num_patients < MIN_PATIENTS_FOR_VALIDATION:
        return 0
    return min(MAX_VALIDATION_PATIENTS, int(round(VALIDATION_FRACTION * num_patients)))


def split_site(dataset: Any, salt: bytes, hold_out: bool = True) -> SiteSplit:
    """Split ``dataset`` (a :class:`common.data.CaseDataset`) by patient with the site's ``salt``; with
    ``hold_out=False`` (a site whose policy answers no evaluation) every patient trains."""
    groups = [tuple(g) for g in dataset.patient_groups()]
    n_val = validation_size(len(groups)) if hold_out else 0

    def rank(group: tuple[int, ...]) -> str:
        key = dataset.group_key(group).encode("utf-8")
        return hmac.new(salt, b"fedfusion-validation\0" + key, hashlib.sha256).hexdigest()

    held = set(sorted(range(len(groups)), key=lambda g: rank(groups[g]))[:n_val])
    return SiteSplit(
        train_groups=tuple(g for k, g in enumerate(groups) if k not in held),
        validation_groups=tuple(g for k, g in enumerate(groups) if k in held),
    )
