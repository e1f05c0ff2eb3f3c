"""Named multi-site scenarios: how phantom hospitals differ from one another.

========================= =========================================================================================
scenario                  sites differ in
========================= =========================================================================================
``iid``                   nothing: every site has all six modalities, the same scanner, class balance and size
``modality-skew``         which modalities they acquire (site A all MRI, B CT + T1, C US + T2, ... cycling)
``label-skew``            class balance (malignant share spread from ~15 % to ~80 %)
``scanner-skew``          scanners: vendor, intensity gain, noise, voxel spacing, MR bias, US attenuation
``realistic`` (default)   all of the above, plus per-case missing series and case counts varying around K
========================= =========================================================================================

The held-out cohorts always have every modality for every case and a balanced mix: ``heldout/`` (the reported
numbers) and ``validation/`` (model selection) with a reference scanner (:func:`heldout_profile`), and
``heldout-unseen/`` with a vendor and scanner settings no training site has (:func:`unseen_profile`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from common.layout import HELDOUT_NAME, UNSEEN_NAME
from models.modalities import MODALITIES

from .phantoms import UNSEEN_VENDOR, VENDORS, SiteProfile

#: Modality subsets of the modality-skew sites, cycled for more sites (each keeps at least two series).
SKEW_SUBSETS: tuple[tuple[str, ...], ...] = (
    ("t1", "t1ce", "t2", "flair"),  # A: a neuro MRI centre
    ("t1", "ct"),                   # B: emergency CT plus a plain T1
    ("t2", "us"),                   # C: intra-operative ultrasound plus T2
    ("t1ce", "flair", "ct"),        # D
    ("t1", "t2", "us"),             # E
    ("t1ce", "t2", "ct", "us"),     # F
)

#: Synthetic hospital names (InstitutionName), cycled.
INSTITUTIONS: tuple[str, ...] = (
    "St. Phantom University Hospital", "Riverside Synthetic Medical Centre", "Northgate Imaging Clinic",
    "Lakeside Simulated Hospital", "Old Town Virtual Infirmary", "Hillcrest Mock Medical Center",
    "Harbour Phantom Clinic", "Meadowbrook Test Hospital",
)

#: Class balance (malignant share) of label-skew sites, cycled.
LABEL_SKEW: tuple[float, ...] = (0.15, 0.5, 0.8, 0.3, 0.65)

DEFAULT_MALIGNANT = 0.4


def site_name(index: int) -> str:
    """Folder name of site ``index`` (0-based): ``site-01``, ``site-02``, ..."""
    return f"site-{index + 1:02d}"


def _base(index: int, cases: int) -> SiteProfile:
    return SiteProfile(
        name=site_name(index),
        n_cases=cases,
        malignant_fraction=DEFAULT_MALIGNANT,
        vendor=VENDORS[index % len(VENDORS)],
        institution=INSTITUTIONS[index % len(INSTITUTIONS)],
    )


def _scanner(rng: np.random.Generator, site: SiteProfile) -> SiteProfile:
    """A site's own scanners: intensity gains, noise, field of view (-> spacing), bias, US attenuation."""
    gain = {m: float(rng.uniform(0.7, 1.4)) for m in MODALITIES if m != "ct"}
    fov = (
        float(rng.uniform(105.0, 140.0)),
        float(rng.uniform(185.0, 230.0)),
        float(rng.uniform(165.0, 210.0)),
    )
    return replace(
        site,
        gain=gain,
        noise=float(rng.uniform(0.7, 1.6)),
        fov=fov,
        bias=float(rng.uniform(0.06, 0.2)),
        misregistration=float(rng.uniform(0.6, 1.4)),
        ct_offset=float(rng.uniform(-4.0, 4.0)),
        us_attenuation=float(rng.uniform(0.7, 1.4)),
    )


def iid(n_sites: int, cases_per_site: int, rng: np.random.Generator) -> list[SiteProfile]:
    """All sites alike: every modality, same scanner, class balance and size."""
    return [replace(_base(i, cases_per_site), vendor=VENDORS[0]) for i in range(n_sites)]


def modality_skew(n_sites: int, cases_per_site: int, rng: np.random.Generator) -> list[SiteProfile]:
    """Each site acquires a different modality subset (:data:`SKEW_SUBSETS`, cycled); otherwise alike."""
    return [
        replace(_base(i, cases_per_site), modalities=SKEW_SUBSETS[i % len(SKEW_SUBSETS)])
        for i in range(n_sites)
    ]


def label_skew(n_sites: int, cases_per_site: int, rng: np.random.Generator) -> list[SiteProfile]:
    """Different class balance per site (:data:`LABEL_SKEW`, cycled); otherwise alike."""
    return [
        replace(_base(i, cases_per_site), vendor=VENDORS[0], malignant_fraction=LABEL_SKEW[i % len(LABEL_SKEW)])
        for i in range(n_sites)
    ]


def scanner_skew(n_sites: int, cases_per_site: int, rng: np.random.Generator) -> list[SiteProfile]:
    """Same modalities and patients, different scanners (vendor, gain, noise, spacing, bias)."""
    return [_scanner(rng, _base(i, cases_per_site)) for i in range(n_sites)]


def realistic(n_sites: int, cases_per_site: int, rng: np.random.Generator) -> list[SiteProfile]:
    """Modality skew + per-case missing series + scanner differences + label imbalance + varying sizes."""
    sites = []
    for i in range(n_sites):
        site = _scanner(rng, _base(i, cases_per_site))
        cases = max(2, int(round(cases_per_site * rng.uniform(0.7, 1.3))))
        sites.append(
            replace(
                site,
                modalities=SKEW_SUBSETS[i % len(SKEW_SUBSETS)],
                n_cases=cases,
                malignant_fraction=float(rng.uniform(0.2, 0.65)),
                missing_rate=float(rng.uniform(0.05, 0.2)),
            )
        )
    return sites


#: Scenario name -> builder ``(n_sites, cases_per_site, rng) -> [SiteProfile, ...]``.
SCENARIOS: dict[str, Callable[[int, int, np.random.Generator], list[SiteProfile]]] = {
    "iid": iid,
    "modality-skew": modality_skew,
    "label-skew": label_skew,
    "scanner-skew": scanner_skew,
    "realistic": realistic,
}


def with_missing_fraction(sites: list[SiteProfile], fraction: float) -> list[SiteProfile]:
    """Make each site lack a controlled share of the six modalities (site level: a lacked series is never acquired).

    The federation keeps ``round(N * M * (1 - fraction))`` (site, modality) slots (half up, at least one per site),
    spread as evenly as possible over the ``N`` sites (site sizes differ by at most one); each site's kept modalities
    are a window of :data:`MODALITIES` that starts where the previous site's ended, so together the sites cover as
    many modalities as the slots allow (e.g. 4 sites at 75 %: every modality at exactly one site). Per-case gaps
    (``missing_rate``) are switched off so the share is exact; the realised share is ``1 - slots / (N * M)``.

    Raises:
        ValueError: for a fraction outside [0, 1).
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"missing fraction must be in [0, 1) (0 = every site has every modality), got {fraction}")
    n, m = len(sites), len(MODALITIES)
    slots = max(n, int(n * m * (1.0 - float(fraction)) + 0.5))
    out, start = [], 0
    for i, site in enumerate(sites):
        k = min(m, slots // n + (1 if i < slots % n else 0))
        chosen = {MODALITIES[(start + j) % m] for j in range(k)}
        start = (start + k) % m
        out.append(replace(site, modalities=tuple(x for x in MODALITIES if x in chosen), missing_rate=0.0))
    return out


def site_profiles(
    scenario: str, n_sites: int, cases_per_site: int, seed: int = 0, missing_fraction: float | None = None
) -> list[SiteProfile]:
    """The sites of a named scenario, deterministic for ``seed``; with ``missing_fraction`` each site then lacks
    that share of the modalities (:func:`with_missing_fraction`).

    Raises:
        ValueError: for an unknown scenario (listing the known ones), non-positive sizes or a bad fraction.
    """
    key = scenario.strip().lower()
    if key not in SCENARIOS:
        raise ValueError(f"unknown phantom scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    if n_sites < 1:
        raise ValueError(f"the number of sites must be at least 1, got {n_sites}")
    if cases_per_site < 1:
        raise ValueError(f"cases per site must be at least 1, got {cases_per_site}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5CE7]))
    sites = SCENARIOS[key](n_sites, cases_per_site, rng)
    if missing_fraction is not None:
        sites = with_missing_fraction(sites, missing_fraction)
    return sites


def heldout_profile(cases: int, name: str = HELDOUT_NAME) -> SiteProfile:
    """A held-out cohort of the federation's own kind of scanner (the reporting set ``heldout/``, and the selection
    set ``validation/``): every modality for every case, balanced classes, a reference scanner."""
    return SiteProfile(
        name=name,
        modalities=MODALITIES,
        n_cases=cases,
        malignant_fraction=0.5,
        missing_rate=0.0,
        vendor=VENDORS[0],
        institution="Federation Reference Centre",
    )


def unseen_profile(cases: int) -> SiteProfile:
    """The unseen-scanner cohort (``heldout-unseen/``): a vendor no training site has (:data:`UNSEEN_VENDOR`: its own
    series descriptions and DICOM tags) and scanner settings at the edges of the training sites' ranges (see
    :func:`_scanner`): brighter MR/US gains, more noise, a smaller field of view, a stronger bias field and a CT
    calibration offset; every modality, balanced classes."""
    return SiteProfile(
        name=UNSEEN_NAME,
        modalities=MODALITIES,
        n_cases=cases,
        malignant_fraction=0.5,
        missing_rate=0.0,
        fov=(110.0, 190.0, 170.0),
        vendor=UNSEEN_VENDOR,
        institution="Outside Referral Hospital",
        gain={m: 1.35 for m in MODALITIES if m != "ct"},
        noise=1.5,
        bias=0.2,
        misregistration=1.3,
        ct_offset=5.0,
        us_attenuation=1.35,
    )
