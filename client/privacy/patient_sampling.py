"""Patient-level DP-SGD: Poisson sampling over patients and one gradient clip per patient.

A patient may have several studies (case folders) at a site. With one study as the privacy unit, a patient with
``k`` studies would be protected only at ``k``-fold epsilon (group privacy). Here the unit is the patient:

* **sampling**: every step draws each *patient* independently with probability ``q`` (Poisson, as Opacus does for
  samples) and the batch holds all studies of the drawn patients (:class:`PatientPoissonSampler`);
* **clipping**: Opacus computes per-study gradients ``p.grad_sample`` (one row per study of the batch); before it
  clips them, :func:`sum_grad_samples_by_patient` replaces them with one row per patient, the *sum* of that
  patient's study gradients, so Opacus's per-row clip bounds each patient's whole contribution by ``C``
  (:func:`clip_per_patient` installs this in a ``DPOptimizer``);
* **accounting**: the noise ``sigma * C`` and the sampling rate ``q`` per patient are exactly the sampled Gaussian
  mechanism over patients, so the RDP accountant's ``(sigma, q, steps)`` is the patient-level guarantee.

With one study per patient (the phantoms) the sampler makes exactly the draw of Opacus's
``UniformWithReplacementSampler`` (each item in with probability ``q``, independently), and the per-patient sum is
the identity. The draws come from a ``draw(n, q)`` function: the site's randomness (:mod:`client.privacy.randomness`:
the OS CSPRNG, never a value the server sends), not torch's generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["PatientPoissonSampler", "clip_per_patient", "patient_loader", "sum_grad_samples_by_patient"]


class PatientPoissonSampler(Sampler[list[int]]):
    """Batches of dataset indices: each step draws every patient with probability ``sample_rate``.

    Args:
        groups: dataset indices of each patient's studies (every index in exactly one group).
        sample_rate: Poisson probability ``q`` per patient and step.
        steps: batches per epoch.
        draw: ``draw(n, q) -> (n,) bool``, each of ``n`` items in with probability ``q`` (the site's randomness,
            :meth:`client.privacy.randomness.RandomStream.poisson_mask`).

    After each batch is yielded, :attr:`owner` holds, for every index of that batch, the position (0..k-1) of its
    patient among the batch's ``k`` patients: what :func:`sum_grad_samples_by_patient` needs. This is only
    in step with training when the loader fetches batch by batch (``num_workers=0``, :func:`patient_loader`).
    """

    def __init__(self, groups: Sequence[Sequence[int]], sample_rate: float, steps: int,
                 draw: Callable[[int, float], torch.Tensor]) -> None:
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError("patient sampling needs at least one patient, each with at least one study")
        flat = [int(i) for g in groups for i in g]
        if len(flat) != len(set(flat)):
            raise ValueError("a study belongs to more than one patient group; patient groups must be disjoint")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"patient sample rate must be in (0, 1], got {sample_rate}")
        self.groups = [list(map(int, g)) for g in groups]
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        self.draw = draw
        self.owner = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            # the same draw as Opacus's UniformWithReplacementSampler, over patients instead of samples
            drawn = self.draw(len(self.groups), self.sample_rate).nonzero()
            indices: list[int] = []
            owner: list[int] = []
            for k, g in enumerate(drawn.reshape(-1).tolist()):
                indices.extend(self.groups[g])
                owner.extend([k] * len(self.groups[g]))
            self.owner = torch.tensor(owner, dtype=torch.long)
            yield indices


def patient_loader(dataset: Dataset, groups: Sequence[Sequence[int]], sample_rate: float, steps: int,
                   draw: Callable[[int, float], torch.Tensor], pin_memory: bool = False) -> DataLoader:
    """A loader of patient-Poisson batches over ``dataset`` whose empty batches keep the item structure (as
    Opacus's ``DPDataLoader``); its ``batch_sampler`` is the :class:`PatientPoissonSampler`."""
    from opacus.data_loader import wrap_collate_with_empty
    from torch.utils.data import default_collate

    sampler = PatientPoissonSampler(groups, sample_rate, steps, draw)
    # num_workers=0: the sampler's ``owner`` must describe the batch being trained on, not a prefetched one
    return DataLoader(dataset, batch_sampler=sampler, num_workers=0, pin_memory=pin_memory,
                      collate_fn=wrap_collate_with_empty(collate_fn=default_collate))


def sum_grad_samples_by_patient(params: Sequence[torch.Tensor], owner: torch.Tensor) -> None:
    """Replace every ``p.grad_sample`` (one row per study, ``(n, *p.shape)``) by one row per patient: the sum of the
    rows of that patient's studies, ``(k, *p.shape)`` with ``k = owner.max() + 1``.

    ``owner (n,)`` gives each study's patient position. Parameters without per-study gradients and empty batches
    (noise-only steps, ``n = 0``) are left as they are.

    Raises:
        RuntimeError: the per-study gradients do not have one row per study of the batch.
    """
    n = int(owner.numel())
    k = int(owner.max()) + 1 if n else 0
    for p in params:
        gs: Any = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        if isinstance(gs, list):
            gs = torch.cat(gs, dim=0)
        if gs.shape[0] == 0:
            continue
        if gs.shape[0] != n:
            raise RuntimeError(
                f"per-study gradients have {gs.shape[0]} rows but the batch has {n} studies; patient-level clipping "
                "needs the loader's batches in step with training (num_workers=0, one backward pass per step)"
            )
        p.grad_sample = gs.new_zeros((k, *gs.shape[1:])).index_add_(0, owner.to(gs.device), gs)


def clip_per_patient(optimizer: Any, sampler: PatientPoissonSampler, expected_patients: int) -> None:
    """Make an Opacus ``DPOptimizer`` clip (and average) per patient of ``sampler``'s batches.

    Its ``clip_and_accumulate`` (called by ``pre_step`` before noise, also for noise-only steps) first sums the
    per-study gradients by patient; ``expected_batch_size`` (the mean-loss divisor) becomes the expected number of
    patients per step.
    """
    clip_studies = optimizer.clip_and_accumulate

    def clip_patients() -> None:
        sum_grad_samples_by_patient(optimizer.params, sampler.owner)
        clip_studies()

    optimizer.clip_and_accumulate = clip_patients
    optimizer.expected_batch_size = max(1, int(expected_patients))
