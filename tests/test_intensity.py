"""Per-kind intensity normalisation (common/data/intensity.py) on arrays whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.dataset import preprocess_case
from common.data.intensity import CT_WINDOW, foreground_mask, normalise, otsu_threshold


def _head(shape: tuple[int, int, int] = (6, 24, 24), radius: float = 8.0) -> np.ndarray:
    """Boolean ball-ish head: a cylinder of ``radius`` voxels through every axial slice."""
    _, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= radius**2
    return np.broadcast_to(disc, shape).copy()


def test_ct_is_windowed_then_z_scored_over_the_head() -> None:
    head = _head()
    ct = np.full(head.shape, -1000.0)  # air
    ct[head] = 30.0  # brain
    ct[:, 11:13, 11:13] = 800.0  # a calcification, far above the window
    ct[:, 4, 12] = 1100.0  # bone, on the head's edge
    out = normalise(ct, "ct")
    clipped = np.clip(ct, *CT_WINDOW)
    inside = clipped[head]
    expected = (clipped - inside.mean()) / inside.std()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # the window keeps the brain's HU steps large: 10 HU is a sizeable fraction of a z-unit, not ~0.01
    brighter = ct.copy()
    brighter[:, 8, 8] = 40.0
    step = normalise(brighter, "ct")[0, 8, 8] - normalise(ct, "ct")[0, 8, 8]
    assert step > 0.1
    # air stays the lowest value and the calcification saturates at the window's top
    assert out[0, 0, 0] == pytest.approx(out.min()) and out[0, 12, 12] == pytest.approx(out.max())


def test_mr_is_z_scored_inside_the_head_not_over_air() -> None:
    head = _head()
    rng = np.random.default_rng(0)
    mr = np.where(head, 500.0 + 50.0 * rng.standard_normal(head.shape), 5.0 * rng.random(head.shape))
    mr[:, 12, 12] = 2.0  # a dark ventricle voxel inside the head: still head (holes are filled)
    mask = foreground_mask(mr, "t1")
    np.testing.assert_array_equal(mask, head)
    out = normalise(mr, "t1")
    assert abs(float(out[head].mean())) < 1e-5 and float(out[head].std()) == pytest.approx(1.0, abs=1e-5)
    # z-scored over the whole volume the head would sit at ~+1 and air at ~-1: here air is far below the head
    assert float(out[~head].mean()) < -5.0
    # a global gain (another scanner) changes nothing
    np.testing.assert_allclose(normalise(3.0 * mr, "t1"), out, atol=1e-4)


def test_us_is_normalised_within_its_field_of_view_and_blank_images_stay_finite() -> None:
    fov = _head(radius=10.0)
    us = np.where(fov, 80.0, 0.0)
    us[:, 10:14, 10:14] = 160.0
    out = normalise(us, "us")
    assert abs(float(out[fov].mean())) < 1e-5
    assert np.all(np.isfinite(normalise(np.zeros((4, 8, 8)), "us")))
    assert otsu_threshold(us) > 0.0 and otsu_threshold(us) < 160.0


def test_normalise_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown modality 'pet'"):
        normalise(np.zeros((2, 4, 4)), "pet")
    bad = np.zeros((2, 4, 4))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        normalise(bad, "t1")


def test_preprocess_case_uses_the_per_kind_normalisation() -> None:
    head = _head((8, 16, 16), radius=6.0)
    ct = np.where(head, 30.0, -1000.0).astype(np.float32)
    ct[head & (np.arange(16)[None, :, None] < 8)] = 40.0
    t1 = np.where(head, 600.0, 3.0).astype(np.float32)
    t1[head & (np.arange(16)[None, None, :] < 8)] = 400.0
    out = preprocess_case({"ct": ct, "t1": t1}, None, ("t1", "t2", "ct"), (8, 16, 16))
    np.testing.assert_allclose(out["image"][0], normalise(t1, "t1"), atol=1e-4)
    np.testing.assert_allclose(out["image"][2], normalise(ct, "ct"), atol=1e-4)
    assert np.all(out["image"][1] == 0.0) and out["mask"].tolist() == [1.0, 0.0, 1.0]
