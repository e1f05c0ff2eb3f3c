"""Multimodal brain-lesion phantoms: one anatomy, six imaging physics, hospital-like site profiles.

A case is one patient: a head (scalp, skull, CSF, grey/white matter with convoluted boundary, lateral
ventricles) with one lesion of three nested sub-regions (BraTS-like labels, :data:`models.config.SEG_LABELS`):
1 oedema (outer), 3 enhancing rim, 2 non-enhancing core (innermost, holding necrosis and calcifications).

Four latent lesion properties decide the case label (0 benign / 1 malignant) and each is rendered mainly by
different modalities, so no single modality sees every cue (see docs/phantoms.md):

============== ============================================ ==========================================
property       strong cue                                   weak cue
============== ============================================ ==========================================
enhancement    T1ce rim brightness                          CT rim (+0..18 HU)
heterogeneity  T2 bright necrosis, US anechoic necrosis     T1/T1ce/FLAIR/CT faint
calcification  CT dense foci (200..800 HU)                  US bright reflectors + acoustic shadows
oedema extent  FLAIR oedema size                            T2, T1, CT, US faint
============== ============================================ ==========================================

Label: ``score = (z_enh + z_het - z_calc + z_oed) / 2 + N(0, 0.15^2)`` over standard-normal latents,
``label = score > 0``; a requested label is met by rejection sampling of the latents (so a site's class balance
is exact while each cue stays a noisy, partial predictor).

Geometry: every volume is ``vol[k, j, i]`` of shape ``(D, H, W)`` on the case's reference grid (slices
inferior->superior, rows anterior->posterior, columns right->left; :mod:`common.data.geometry`). The anatomy is
defined relative to the field of view, so any shape shows the same head; the site's field of view in mm sets the
voxel spacing. Per-modality misregistration moves image content, never the segmentation.

Speed: everything is whole-array numpy/scipy; one 32x64x64 case with all six modalities takes ~0.1 s of CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.special import ndtr

from models.modalities import MODALITIES, canonical

#: Tissue classes mixed by partial-volume fractions, in painting order (later ones cover earlier ones).
TISSUES: tuple[str, ...] = (
    "air", "scalp", "skull", "csf", "gm", "wm", "oedema", "rim", "core", "necrosis", "calcification",
)
_T = {name: i for i, name in enumerate(TISSUES)}

#: Default reference-grid shape ``(D, H, W)``.
DEFAULT_SHAPE: tuple[int, int, int] = (32, 64, 64)

#: Scanner vendors a site can have; they pick SeriesDescription wording and manufacturer tags (phantom_writers).
VENDORS: tuple[str, ...] = ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips Medical Systems", "CANON_MEC")
#: A vendor no training site ever has (scenarios cycle :data:`VENDORS`): the unseen-scanner cohort's.
UNSEEN_VENDOR = "UIH"

#: Latent property names, in the order of the score weights.
PROPERTIES: tuple[str, ...] = ("enhancement", "heterogeneity", "calcification", "oedema_extent")
#: Score weights of the standardised latents (calcification argues for benign, as in low-grade tumours).
SCORE_WEIGHTS: tuple[float, ...] = (0.5, 0.5, -0.5, 0.5)
#: Standard deviation of the label noise added to the score: with the latents known the label is right 95 % of the
#: time (``simulations.phantom_cues.analytic_ceiling``), so a model that reads every cue can pass 0.90.
SCORE_NOISE: float = 0.15


@dataclass(frozen=True)
class SiteProfile:
    """A hospital: which series it acquires, its scanners and its patient mix.

    Attributes:
        name: site folder name, e.g. ``site-01`` (``heldout`` for the server's test set).
        modalities: series the site acquires (canonical order); per-case gaps come from ``missing_rate``.
        n_cases: number of cases (patients) the site holds.
        malignant_fraction: share of label-1 cases (realised exactly, rounded, at least one of each class).
        missing_rate: per-case probability that one acquired series is missing (at least one series is kept).
        fov: field of view ``(z, y, x)`` in mm; voxel spacing = ``fov / shape``.
        vendor: one of :data:`VENDORS`, or :data:`UNSEEN_VENDOR` for the unseen-scanner cohort (protocol names and
            DICOM manufacturer tags follow it).
        institution: InstitutionName written into DICOM headers (synthetic).
        gain: per-modality intensity scale of the scanner (MR/US only; CT stays in HU).
        noise: multiplier of every modality's noise level (older scanner / lower dose > 1).
        bias: MR bias-field strength (standard deviation of the log-field polynomial coefficients).
        misregistration: multiplier of the inter-modality misregistration (0 = perfectly co-registered).
        ct_offset: CT calibration offset in HU.
        us_attenuation: ultrasound depth-attenuation multiplier (probe frequency / gain settings).
    """

    name: str = "site-00"
    modalities: tuple[str, ...] = MODALITIES
    n_cases: int = 20
    malignant_fraction: float = 0.4
    missing_rate: float = 0.0
    fov: tuple[float, float, float] = (120.0, 200.0, 180.0)
    vendor: str = "SIEMENS"
    institution: str = "Phantom General Hospital"
    gain: Mapping[str, float] = field(default_factory=dict)
    noise: float = 1.0
    bias: float = 0.12
    misregistration: float = 1.0
    ct_offset: float = 0.0
    us_attenuation: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", canonical(self.modalities))
        if self.vendor not in (*VENDORS, UNSEEN_VENDOR):
            raise ValueError(f"site {self.name}: unknown vendor {self.vendor!r}; choose one of "
                             f"{', '.join((*VENDORS, UNSEEN_VENDOR))}")
        if not 0.0 <= self.malignant_fraction <= 1.0:
            raise ValueError(f"site {self.name}: malignant_fraction must be in [0, 1], got {self.malignant_fraction}")
        if not 0.0 <= self.missing_rate < 1.0:
            raise ValueError(f"site {self.name}: missing_rate must be in [0, 1), got {self.missing_rate}")
        if min(self.fov) <= 0:
            raise ValueError(f"site {self.name}: field of view must be positive mm, got {self.fov}")

    def spacing(self, shape: Sequence[int] = DEFAULT_SHAPE) -> tuple[float, float, float]:
        """Voxel size ``(dz, dy, dx)`` in mm for a reference grid of ``shape`` ``(D, H, W)``."""
        return tuple(float(f) / int(n) for f, n in zip(self.fov, shape))  # type: ignore[return-value]

    def gain_of(self, modality: str) -> float:
        return float(self.gain.get(modality, 1.0))


DEFAULT_SITE = SiteProfile()


@dataclass
class LesionProperties:
    """The latent lesion properties of one case (each ``p_*`` in (0, 1), the normal CDF of its latent ``z``)."""

    z: np.ndarray  # (4,) standard-normal latents in PROPERTIES order
    score: float
    label: int

    @property
    def p(self) -> np.ndarray:
        """(4,) properties in (0, 1): enhancement, heterogeneity, calcification, oedema extent."""
        return ndtr(self.z)

    def as_dict(self) -> dict[str, float]:
        out = {name: float(v) for name, v in zip(PROPERTIES, self.p)}
        out["score"] = float(self.score)
        return out


def sample_lesion(rng: np.random.Generator, label: int | None = None, max_tries: int = 10_000) -> LesionProperties:
    """Draw lesion latents; with ``label`` given, redraw until the noisy score agrees (rejection sampling)."""
    if label is not None and label not in (0, 1):
        raise ValueError(f"label must be 0 (benign), 1 (malignant) or None, got {label!r}")
    weights = np.asarray(SCORE_WEIGHTS)
    for _ in range(max_tries):
        z = rng.standard_normal(len(PROPERTIES))
        score = float(weights @ z + SCORE_NOISE * rng.standard_normal())
        drawn = int(score > 0.0)
        if label is None or drawn == label:
            return LesionProperties(z=z, score=score, label=drawn)
    raise RuntimeError("could not sample a lesion for the requested label")  # pragma: no cover (p ~ 0.5 per try)


@dataclass
class PhantomCase:
    """One synthetic patient on its reference grid.

    Attributes:
        case_id: site-local case id (the case folder name), e.g. ``case-0001``.
        volumes: modality -> ``(D, H, W)`` float32 in physical units (MR arbitrary units >= 0, CT Hounsfield
            units in [-1024, 3071], US echo 0..255); only acquired modalities are present.
        seg: ``(D, H, W)`` uint8 labels 0 background, 1 oedema, 2 non-enhancing core, 3 enhancing rim.
        label: 0 benign, 1 malignant.
        affine: 4x4 RAS affine of the reference grid (index ``(k, j, i)`` -> mm).
        properties: latent lesion properties in (0, 1), the score, and a few sizes (for analysis and docs).
    """

    case_id: str
    volumes: dict[str, np.ndarray]
    seg: np.ndarray
    label: int
    affine: np.ndarray
    properties: dict[str, float] = field(default_factory=dict)


def reference_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine of an axial stack ``vol[k, j, i]``: k inferior->superior, j anterior->posterior,
    i right->left (the canonical S, P, L axes), centred on the origin."""
    dz, dy, dx = (float(s) for s in spacing)
    affine = np.array(
        [[0.0, 0.0, -dx, 0.0], [0.0, -dy, 0.0, 0.0], [dz, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    centre = (np.asarray(shape, dtype=float) - 1.0) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


# ---------------------------------------------------------------------------------------------------------------
# fields and partial volume
# ---------------------------------------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Smooth Gaussian random field, zero mean, unit standard deviation, float32 ``shape``."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox, mode="wrap", truncate=3.0)
    f -= f.mean()
    return f / (f.std() + 1e-8)


def _fraction(f: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of the region ``f < 0`` per voxel, for an implicit function ``f``.

    The signed distance in voxels to the surface is ``f / ||grad f||_1`` (the L1 norm of the index-space
    gradient is the voxel's extent along the surface normal), so the fraction ramps linearly from 1 to 0 across
    one voxel: the same as averaging a sharp boundary over the voxel, without supersampling.
    """
    g = np.abs(np.gradient(f))
    width = g[0] + g[1] + g[2] + 1e-6
    return np.clip(0.5 - f / width, 0.0, 1.0).astype(np.float32)


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoid radius ``q`` (``q < 1`` inside), broadcast over the coordinate ``grid``."""
    q2 = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, semi))
    return np.sqrt(q2).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# tissue values per modality (clean, before scanner effects)
# ---------------------------------------------------------------------------------------------------------------

#:                 air   scalp skull csf   gm    wm    oed   rim   core  necr  calc
_BASE: dict[str, tuple[float, ...]] = {
    "t1":    (0.0, 850, 60, 250, 520, 720, 580, 490, 400, 350, 360),
    "t1ce":  (0.0, 900, 60, 270, 540, 730, 590, 500, 410, 360, 370),
    "t2":    (0.0, 450, 40, 1400, 780, 560, 880, 850, 820, 1380, 640),
    "flair": (0.0, 600, 40, 90, 640, 470, 1000, 895, 790, 700, 600),
    "ct":    (-1000, 20, 1100, 6, 38, 28, 24, 34, 30, 27, 250),
    "us":    (0.0, 120, 230, 8, 55, 75, 82, 165, 105, 22, 250),
}

#: Relative texture amplitude of the core per modality, at zero and full heterogeneity: the core's necrotic
#: mottling shows as texture mainly on T2 and US.
_CORE_TEXTURE: dict[str, tuple[float, float]] = {
    "t1": (0.02, 0.04), "t1ce": (0.02, 0.04), "t2": (0.03, 0.25),
    "flair": (0.02, 0.05), "ct": (0.0, 0.0), "us": (0.05, 0.35),
}


def _tissue_values(modality: str, p: np.ndarray) -> np.ndarray:
    """Clean tissue values (len(TISSUES),) of ``modality`` for a lesion with properties ``p`` (PROPERTIES order)."""
    v = np.asarray(_BASE[modality], dtype=np.float32).copy()
    enh, _het, calc, _oed = (float(x) for x in p)
    if modality == "t1ce":
        v[_T["rim"]] += 200.0 + 800.0 * enh  # gadolinium uptake of the rim: the enhancement cue
        v[_T["scalp"]] += 40.0
    elif modality == "ct":
        v[_T["rim"]] += 18.0 * enh  # iodine: the same cue, weakly
        v[_T["calcification"]] = 200.0 + 600.0 * calc
    elif modality == "us":
        v[_T["calcification"]] = 170.0 + 80.0 * calc
    return v


# ---------------------------------------------------------------------------------------------------------------
# the case
# ---------------------------------------------------------------------------------------------------------------


def make_case(
    rng: np.random.Generator,
    case_id: str,
    shape: Sequence[int] = DEFAULT_SHAPE,
    site: SiteProfile | None = None,
    modalities: Sequence[str] = MODALITIES,
    label: int | None = None,
) -> PhantomCase:
    """Render one patient.

    Args:
        rng: the case's generator (all randomness comes from it: same state -> identical case).
        case_id: site-local id, e.g. ``case-0001``.
        shape: reference grid ``(D, H, W)``; each at least 8.
        site: scanner and spacing profile (default :data:`DEFAULT_SITE`); ``site.modalities`` is NOT applied
            here (``modalities`` says what to render), so callers decide per-case gaps.
        modalities: which modalities to render (any subset of :data:`MODALITIES`).
        label: force the case label (0/1); ``None`` lets the lesion properties decide.

    Returns:
        a :class:`PhantomCase` with float32 volumes of ``shape`` for ``modalities`` and the uint8 segmentation.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes (D, H, W) of at least 8 voxels each, got {shape}")
    site = site or DEFAULT_SITE
    mods = canonical(modalities)
    spacing = np.asarray(site.spacing(shape))
    affine = reference_affine(shape, spacing)

    props = sample_lesion(rng, label)
    p = props.p
    fractions, seg, info = _anatomy(rng, shape, spacing, p)

    volumes: dict[str, np.ndarray] = {}
    core_tex = _smooth_field(rng, shape, (1.0, 1.2, 1.2))
    brain_tex = _smooth_field(rng, shape, (2.0, 3.0, 3.0))
    # one child generator per modality, drawn for all six: a case is the same whatever subset is rendered
    child_seeds = rng.integers(0, 2**63 - 1, size=len(MODALITIES))
    for m, child_seed in zip(MODALITIES, child_seeds):
        if m not in mods:
            continue
        mrng = np.random.default_rng(int(child_seed))
        clean = _render_clean(m, fractions, p, core_tex, brain_tex)
        clean = _misregister(mrng, clean, spacing, site.misregistration, cval=float(_BASE[m][0]))
        if m in ("t1", "t1ce", "t2", "flair"):
            vol = _mr_physics(mrng, clean, site, m)
        elif m == "ct":
            vol = _ct_physics(mrng, clean, site)
        else:
            vol = _us_physics(mrng, clean, fractions, site, spacing)
        volumes[m] = vol.astype(np.float32, copy=False)

    properties = props.as_dict() | info
    return PhantomCase(case_id=case_id, volumes=volumes, seg=seg, label=props.label, affine=affine,
                       properties=properties)


def _anatomy(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray, p: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Tissue fractions ``(len(TISSUES), D, H, W)`` float32 (summing to 1), segmentation, and lesion sizes."""
    D, H, W = shape
    half = np.asarray(shape, dtype=np.float32) / 2.0
    # normalised coordinates in [-1, 1] across the field of view (anatomy scales with the FOV, not the shape)
    nz = ((np.arange(D, dtype=np.float32) - (D - 1) / 2) / half[0]).reshape(D, 1, 1)
    ny = ((np.arange(H, dtype=np.float32) - (H - 1) / 2) / half[1]).reshape(1, H, 1)
    nx = ((np.arange(W, dtype=np.float32) - (W - 1) / 2) / half[2]).reshape(1, 1, W)
    grid = (nz, ny, nx)
    fov = half * 2 * spacing.astype(np.float32)  # mm

    # head: a subject-specific size and a small offset
    s = rng.uniform(0.93, 1.0)
    head_c = rng.uniform(-0.03, 0.03, size=3)
    head_semi = np.array([1.15, 0.90, 0.84]) * s
    q_head = _ellipsoid(grid, head_c, head_semi)
    gyri = _smooth_field(rng, shape, (1.0, 1.5, 1.5))
    q_wm = q_head / 0.68 + 0.05 * gyri  # convoluted grey/white boundary

    ventricles = np.minimum(
        _ellipsoid(grid, head_c + [0.08, -0.05, 0.12 * s], np.array([0.30, 0.30, 0.095]) * s),
        _ellipsoid(grid, head_c + [0.08, -0.05, -0.12 * s], np.array([0.30, 0.30, 0.095]) * s),
    )
    # two ventricles as one implicit function: min of the two normalised radii

    # lesion: in one hemisphere, away from the ventricles, inside the brain
    r_mm = rng.uniform(0.09, 0.13) * float(min(fov[1], fov[2]))  # rim outer radius (mm)
    semi_mm = r_mm * rng.uniform(0.85, 1.15, size=3)
    # keep every sub-region at least a couple of voxels thick, whatever the grid
    semi_mm = np.maximum(semi_mm, 3.2 * spacing)
    semi_n = semi_mm / (fov / 2)  # in normalised units per axis
    side = rng.choice([-1.0, 1.0])
    centre = head_c + np.array(
        [rng.uniform(-0.25, 0.25), rng.uniform(-0.35, 0.35), side * rng.uniform(0.32, 0.42)]
    ) * np.array([1.0, 1.0, s])
    # pull the centre inwards until the lesion (with its oedema margin) fits in the brain ellipsoid
    brain_semi = head_semi * 0.84
    for _ in range(20):
        reach = np.abs(centre - head_c) + 1.3 * semi_n
        if np.sum((reach / brain_semi) ** 2) <= 1.0:
            break
        centre = head_c + 0.9 * (centre - head_c)

    shape_noise = _smooth_field(rng, shape, tuple(np.maximum(1.0, 0.35 * semi_mm / spacing)))
    d = _ellipsoid(grid, centre, semi_n) + 0.10 * shape_noise  # lesion distance: rim outer surface at d = 1
    # largest change of d from one voxel to its 6-neighbour near the lesion (lesion units, shape noise included):
    # the regions are kept > 1 such step apart, so core, rim and oedema nest on any grid
    near = d < 2.0
    step = max(float(np.max(np.abs(np.diff(d, axis=a))[np.take(near, range(d.shape[a] - 1), axis=a)]))
               for a in range(3))
    r_core = min(rng.uniform(0.55, 0.75), 1.0 - 1.3 * step)
    r_core = max(r_core, 1.3 * step)

    enh, het, calc, oed = (float(x) for x in p)
    # the oedema's extent relative to the lesion is the cue; the smooth front noise is kept small enough that the
    # extent, not the noise, decides the oedema volume
    oed_scale = 1.2 + 1.3 * oed
    oed_noise = _smooth_field(rng, shape, tuple(np.maximum(1.0, 0.5 * semi_mm / spacing)))
    d_oed = d / oed_scale + 0.06 * oed_noise  # finger-like oedema front at d_oed = 1
    # guaranteed collar of oedema around the rim, so the three regions nest
    f_oed = np.minimum(d_oed - 1.0, d - (1.0 + 1.3 * step))

    fr: list[tuple[int, np.ndarray]] = []
    fr.append((_T["scalp"], _fraction(q_head - 1.0)))
    fr.append((_T["skull"], _fraction(q_head - 0.95)))
    fr.append((_T["csf"], _fraction(q_head - 0.89)))
    brain = _fraction(q_head - 0.84)
    fr.append((_T["gm"], brain))
    fr.append((_T["wm"], _fraction(q_wm - 1.0) * brain))
    vent = _fraction(ventricles - 1.0)
    fr.append((_T["csf"], vent))
    parenchyma = brain * (1.0 - vent)
    a_oed = _fraction(f_oed)
    fr.append((_T["oedema"], a_oed * np.maximum(parenchyma, _fraction(d - (1.0 + 1.3 * step)))))
    fr.append((_T["rim"], _fraction(d - 1.0)))
    core = _fraction(d - r_core)
    fr.append((_T["core"], core))

    # necrosis: mottled patches inside the core; their share of the core grows with heterogeneity. The threshold is
    # the field's quantile over the core itself, so the necrotic share of a (small) core is the intended one, not
    # whatever share of a volume-wide quantile happens to fall inside it
    nec_field = _smooth_field(rng, shape, (0.8, 1.0, 1.0))
    nec_share = 0.02 + 0.78 * het
    in_core = core > 0.5
    thr = float(np.quantile(nec_field[in_core] if in_core.any() else nec_field, 1.0 - nec_share))
    fr.append((_T["necrosis"], core * np.clip((nec_field - thr) / 0.6 + 0.5, 0.0, 1.0)))

    # calcifications: small dense foci in core and rim, more with the calcification property
    # the number of foci follows the property (a Poisson count would bury it in counting noise), plus a rare extra
    n_calc = int(round(8.0 * calc)) + int(rng.poisson(0.3))
    calc_frac = np.zeros(shape, dtype=np.float32)
    if n_calc:
        rim_in = d < 0.95
        idx = np.argwhere(rim_in)
        if len(idx):
            picks = idx[rng.integers(0, len(idx), size=n_calc)]
            for k0, j0, i0 in picks:
                rad_mm = rng.uniform(0.8, 1.4) * float(np.min(spacing))
                lo = np.maximum([k0, j0, i0] - np.ceil(rad_mm / spacing + 1).astype(int), 0)
                hi = np.minimum([k0, j0, i0] + np.ceil(rad_mm / spacing + 2).astype(int), shape)
                kk, jj, ii = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                dist = np.sqrt(((kk - k0) * spacing[0]) ** 2 + ((jj - j0) * spacing[1]) ** 2
                               + ((ii - i0) * spacing[2]) ** 2)
                blob = np.clip(0.5 - (dist - rad_mm) / float(np.mean(spacing)), 0, 1).astype(np.float32)
                sub = calc_frac[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                np.maximum(sub, blob, out=sub)
    fr.append((_T["calcification"], calc_frac))

    # paint: every layer covers the mixture beneath it by its own fraction
    F = np.zeros((len(TISSUES), *shape), dtype=np.float32)
    F[_T["air"]] = 1.0
    for t, a in fr:
        F *= 1.0 - a
        F[t] += a

    seg = np.zeros(shape, dtype=np.uint8)
    oed_mask = (f_oed < 0) & ((parenchyma > 0.5) | (d < 1.0 + 1.3 * step))
    seg[oed_mask] = 1
    seg[d < 1.0] = 3
    seg[d < r_core] = 2
    voxel_ml = float(np.prod(spacing)) / 1000.0
    info = {
        "lesion_radius_mm": float(r_mm),
        "oedema_scale": float(oed_scale),
        "calcifications": float(n_calc),
        "necrosis_share": float(nec_share),
        "oedema_ml": float((seg == 1).sum() * voxel_ml),
        "core_ml": float((seg == 2).sum() * voxel_ml),
        "enhancing_ml": float((seg == 3).sum() * voxel_ml),
    }
    return F, seg, info


def _render_clean(
    modality: str, F: np.ndarray, p: np.ndarray, core_tex: np.ndarray, brain_tex: np.ndarray
) -> np.ndarray:
    """Noise-free image: tissue fractions times tissue values, plus core and parenchyma texture."""
    v = _tissue_values(modality, p)
    img = np.einsum("t,t...->...", v, F)  # (much faster than tensordot/BLAS here)
    lo, hi = _CORE_TEXTURE[modality]
    amp = lo + (hi - lo) * float(p[1])
    if amp:
        img += (amp * v[_T["core"]]) * core_tex * F[_T["core"]]
    if modality != "ct":
        # mild anatomical texture of grey/white matter (not of CT: its values are calibrated)
        img += 0.03 * brain_tex * (v[_T["gm"]] * F[_T["gm"]] + v[_T["wm"]] * F[_T["wm"]])
    return img


def _misregister(
    rng: np.random.Generator, img: np.ndarray, spacing: np.ndarray, strength: float, cval: float
) -> np.ndarray:
    """Small rigid motion of the image content (rotation ~0.7 deg, shift ~0.4 voxel, at most ~1 voxel)."""
    angles = np.deg2rad(np.clip(rng.normal(0.0, 0.7, size=3), -1.5, 1.5)) * strength
    shift = np.clip(rng.normal(0.0, 0.4, size=3), -1.0, 1.0) * strength
    if strength <= 0:
        return img
    cz, sz = np.cos(angles[0]), np.sin(angles[0])
    cy, sy = np.cos(angles[1]), np.sin(angles[1])
    cx, sx = np.cos(angles[2]), np.sin(angles[2])
    rz = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])  # rotation in the (j, i) plane: about the z axis
    ry = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])
    rx = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])
    rot_mm = rz @ ry @ rx
    # in index units: S^-1 R S (voxels are anisotropic)
    mat = np.diag(1.0 / spacing) @ rot_mm @ np.diag(spacing)
    centre = (np.asarray(img.shape, dtype=float) - 1.0) / 2.0
    offset = centre - mat @ centre + shift
    return ndimage.affine_transform(img, mat, offset=offset, order=1, mode="constant", cval=cval,
                                    prefilter=False).astype(np.float32)


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """Smooth multiplicative MR bias field: exp of a random quadratic polynomial, mean ~1."""
    D, H, W = shape
    z = np.linspace(-1, 1, D, dtype=np.float32).reshape(D, 1, 1)
    y = np.linspace(-1, 1, H, dtype=np.float32).reshape(1, H, 1)
    x = np.linspace(-1, 1, W, dtype=np.float32).reshape(1, 1, W)
    terms = (z, y, x, z * y, z * x, y * x, z * z, y * y, x * x)
    c = rng.normal(0.0, strength, size=len(terms)).astype(np.float32)
    log_b = sum(ci * t for ci, t in zip(c, terms))
    log_b = np.broadcast_to(log_b, shape)
    return np.exp(log_b - log_b.mean()).astype(np.float32)


def _mr_physics(rng: np.random.Generator, clean: np.ndarray, site: SiteProfile, modality: str) -> np.ndarray:
    """Bias field, scanner gain, then Rician noise (magnitude of complex Gaussian noise)."""
    gain = site.gain_of(modality) * rng.uniform(0.92, 1.08)  # per-exam auto-scaling
    signal = clean * _bias_field(rng, clean.shape, site.bias) * gain
    sigma = 0.025 * 700.0 * gain * site.noise
    re = signal + sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im)


def _ct_physics(rng: np.random.Generator, clean: np.ndarray, site: SiteProfile) -> np.ndarray:
    """Quantum noise: spatially correlated Gaussian in HU (sigma ~6 HU x site noise), calibration offset."""
    noise = ndimage.gaussian_filter(rng.standard_normal(clean.shape, dtype=np.float32), 0.7, truncate=3.0)
    noise *= 6.0 * site.noise / (noise.std() + 1e-8)
    out = clean + noise + site.ct_offset
    return np.clip(out, -1024.0, 3071.0)


def _us_physics(
    rng: np.random.Generator, clean: np.ndarray, F: np.ndarray, site: SiteProfile, spacing: np.ndarray
) -> np.ndarray:
    """Ultrasound through a craniotomy window, probe at the anterior side (row j = 0), beam along +j.

    Specular echoes at interfaces, depth attenuation, acoustic shadowing behind strong reflectors
    (calcifications), multiplicative Rayleigh speckle, scanner gain; echo clipped to 0..255.
    """
    # ``clean`` holds display levels of a 60 dB log-compressed image; the physics acts on linear amplitude
    dyn_range_db = 60.0
    echo = clean + 1.0 * np.abs(np.gradient(clean, axis=1))  # specular echoes at interfaces facing the beam
    amp_db = (echo - 255.0) * (dyn_range_db / 255.0)
    # acoustic shadow: transmission falls with the reflector mass already crossed by the beam
    reflect = F[_T["calcification"]]
    crossed = np.cumsum(reflect, axis=1) - reflect
    shadow_db = -8.0 * crossed  # ~8 dB per calcified voxel crossed
    H = clean.shape[1]
    depth_cm = (np.arange(H, dtype=np.float32) * float(spacing[1]) / 10.0).reshape(1, H, 1)
    attenuation_db = -0.5 * site.us_attenuation * depth_cm  # ~0.5 dB/cm left after time-gain compensation
    gain_db = 20.0 * np.log10(site.gain_of("us") * rng.uniform(0.92, 1.08))
    # speckle: the envelope of smoothed complex Gaussian noise is Rayleigh; normalised to mean 1, multiplicative
    re = ndimage.gaussian_filter(rng.standard_normal(clean.shape, dtype=np.float32), (0.6, 1.0, 0.8), truncate=3.0)
    im = ndimage.gaussian_filter(rng.standard_normal(clean.shape, dtype=np.float32), (0.6, 1.0, 0.8), truncate=3.0)
    speckle = np.sqrt(re * re + im * im)
    speckle /= speckle.mean() + 1e-8
    amplitude = 10.0 ** ((amp_db + shadow_db + attenuation_db + gain_db) / 20.0) * speckle
    amplitude += np.abs(1e-3 * site.noise * rng.standard_normal(clean.shape, dtype=np.float32))  # electronics
    out = 255.0 + (255.0 / dyn_range_db) * 20.0 * np.log10(amplitude + 1e-6)  # log compression to display
    return np.clip(out, 0.0, 255.0)
