"""How much of the class label each phantom modality reveals: ``python -m simulations.phantom_cues``.

For N generated cases it measures a few hand-made image features per modality (median and spread of each
sub-region's intensity, normalised to the case's normal tissue, and the number of abnormal voxels in a fixed box
around the lesion) and reports the 5-fold cross-validated accuracy of a ridge logistic regression on one
modality's features, on all modalities' features, and on the (unobservable) latent lesion properties ``z``, beside
the analytic ceiling of the label (:func:`analytic_ceiling`: the Bayes accuracy with the latents known). The
segmentation is used only to place the regions, never as a feature (its size would leak the oedema extent).
The numbers in docs/phantoms.md come from this script.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import ndimage
from scipy.special import ndtri

from models.modalities import MODALITIES

from .phantoms import PROPERTIES, SCORE_NOISE, SCORE_WEIGHTS, PhantomCase, make_case


def analytic_ceiling(weights: tuple[float, ...] = SCORE_WEIGHTS, noise: float = SCORE_NOISE) -> float:
    """Bayes accuracy of the label with the latents ``z`` known: the label is ``w.z + noise > 0``, so the best rule
    is ``w.z > 0`` and it errs when the noise flips the sign: for jointly Gaussian ``s = w.z`` and ``s + e`` with
    correlation ``rho = |w| / sqrt(|w|^2 + noise^2)``, ``P(same sign) = 1 - arccos(rho) / pi``."""
    norm = math.sqrt(sum(w * w for w in weights))
    return 1.0 - math.acos(norm / math.sqrt(norm * norm + noise * noise)) / math.pi


def modality_features(case: PhantomCase, modality: str) -> list[float]:
    """8 features of one modality of ``case`` (see module docstring)."""
    vol, seg = case.volumes[modality], case.seg
    lesion = seg > 0
    box_lesion = ndimage.binary_dilation(lesion, iterations=3)
    if modality == "ct":
        normal = ~box_lesion & (vol > -100) & (vol < 100)
        x = (vol - np.median(vol[normal])) / 10.0  # HU are calibrated: 10 HU steps
    else:
        normal = ~box_lesion & (vol > np.percentile(vol, 60)) & (vol < np.percentile(vol, 99))
        x = vol / np.median(vol[normal]) - 1.0  # MR/US have no absolute scale
    feats: list[float] = []
    for label in (1, 2, 3):
        r = x[seg == label]
        feats += [float(np.median(r)), float(r.std())]
    cz, cy, cx = (int(round(c)) for c in ndimage.center_of_mass(seg >= 2))
    dz, dy, dx = (max(2, s // 4) for s in seg.shape)
    box = x[max(cz - dz, 0):cz + dz + 1, max(cy - dy, 0):cy + dy + 1, max(cx - dx, 0):cx + dx + 1]
    feats += [float(np.log1p((box > 0.4).sum())), float(np.log1p((box < -0.4).sum()))]
    return feats


def cv_accuracy(X: np.ndarray, y: np.ndarray, folds: int = 5, ridge: float = 1.0) -> float:
    """K-fold accuracy of an L2-regularised logistic regression (Newton steps), features standardised."""
    X = (X - X.mean(0)) / (X.std(0) + 1e-8)
    X = np.c_[X, np.ones(len(X))]
    fold = np.arange(len(y)) % folds
    accs = []
    for f in range(folds):
        tr, te = fold != f, fold == f
        w = np.zeros(X.shape[1])
        for _ in range(30):
            p = 1.0 / (1.0 + np.exp(-X[tr] @ w))
            grad = X[tr].T @ (p - y[tr]) + ridge * w
            hess = (X[tr].T * (p * (1 - p))) @ X[tr] + ridge * np.eye(len(w))
            w -= np.linalg.solve(hess, grad)
        accs.append(float(((X[te] @ w > 0) == y[te]).mean()))
    return float(np.mean(accs))


def cue_table(cases: int = 400, shape: tuple[int, int, int] = (16, 32, 32), seed: int = 1000) -> dict[str, float]:
    """Cross-validated label accuracy per modality, all modalities, and the latent properties; the analytic
    ceiling."""
    feats: dict[str, list[list[float]]] = {m: [] for m in MODALITIES}
    labels, latents = [], []
    for i in range(cases):
        case = make_case(np.random.default_rng(seed + i), f"case-{i + 1:04d}", shape=shape)
        for m in MODALITIES:
            feats[m].append(modality_features(case, m))
        labels.append(case.label)
        # the properties are p = Phi(z); the label is linear in z, so the ceiling is measured on z
        latents.append([float(ndtri(case.properties[p])) for p in PROPERTIES])
    y = np.asarray(labels)
    F = {m: np.asarray(v) for m, v in feats.items()}
    table = {m: cv_accuracy(F[m], y) for m in MODALITIES}
    table["mri (t1+t1ce+t2+flair)"] = cv_accuracy(np.concatenate([F[m] for m in MODALITIES[:4]], 1), y)
    table["all six"] = cv_accuracy(np.concatenate([F[m] for m in MODALITIES], 1), y)
    P = np.asarray(latents)
    for i, p in enumerate(PROPERTIES):
        table[f"latent {p} only"] = cv_accuracy(P[:, [i]], y)
    table["latent all four"] = cv_accuracy(P, y)
    table["analytic ceiling"] = analytic_ceiling()
    table["majority class"] = float(max(y.mean(), 1 - y.mean()))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--shape", type=int, nargs=3, default=(16, 32, 32))
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()
    for name, acc in cue_table(args.cases, tuple(args.shape), args.seed).items():
        print(f"{name:32s} {acc:.3f}")


if __name__ == "__main__":
    main()
