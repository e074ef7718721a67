"""Views: crop sampling (property tests), rendering against analytic coordinates, and the teacher-mode table."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patient.data import views


def coord_image(height=192, width=256):
    """uint8 RGB image whose pixel (y, x) stores R = x, G = y (B = 128): every pixel knows where it is."""
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([xx, yy, np.full_like(xx, 128)], axis=-1).astype(np.uint8)


def decode_axis(values, res, size):
    """Fit pixel-centre coordinates along one output axis; returns (start, length, flipped) in source pixels.

    A bilinear/antialiased resample of a linear ramp is the ramp at the sampling positions, so the output lies on
    `v = start + (j + 0.5) * length / res - 0.5` up to uint8 rounding, except within one filter support of the image
    border (clamped, or black padding). A first fit on the middle half (always inside the image) gives the direction
    and scale; the second uses every output pixel whose filter support lies inside the `size`-pixel source.
    """
    coord = values * 255.0 + 0.5
    j = np.arange(res) + 0.5
    mid = slice(res // 4, res - res // 4)
    slope, intercept = np.polyfit(j[mid], coord[mid], 1)
    flipped = slope < 0
    if flipped:
        coord = coord[::-1]
        slope, intercept = np.polyfit(j[mid], coord[mid], 1)
    support = max(slope, 1.0) + 1.0  # source pixels either side that an output pixel may touch
    predicted = intercept + slope * j
    ok = (predicted > support) & (predicted < size - support)
    slope, intercept = np.polyfit(j[ok], coord[ok], 1)
    return intercept, slope * res, bool(flipped)


def decode_box(view, height=192, width=256):
    """(y0, x0, h, w, flip) in relative coordinates from a rendered coordinate image `f32[C, H, W]`."""
    res_h, res_w = view.shape[1:]
    # R depends on x only and G on y only: read them along the centre row / column (inside the image even for
    # padded crops, whose black border would spoil an average over the other axis).
    x0, w, flip = decode_axis(view[0, res_h // 2, :], res_w, width)
    y0, h, _ = decode_axis(view[1, :, res_w // 2], res_h, height)
    return np.array([y0 / height, x0 / width, h / height, w / width]), flip


# ------------------------------------------------------------------------------------------------- property tests


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    height=st.integers(1, 600),
    width=st.integers(1, 600),
    area_lo=st.floats(0.01, 1.0),
    area_span=st.floats(0.0, 1.0),
    aspect_lo=st.floats(0.2, 2.0),
    aspect_mul=st.floats(1.0, 3.0),
    flip=st.booleans(),
)
def test_inception_crop_inside_and_in_range(seed, height, width, area_lo, area_span, aspect_lo, aspect_mul, flip):
    area = (area_lo, min(1.0, area_lo + area_span))
    aspect = (aspect_lo, aspect_lo * aspect_mul)
    p = views.inception_crop(np.random.default_rng(seed), height, width, area=area, aspect=aspect, flip=flip)
    eps = 1e-9
    assert 0 <= p.y0 and 0 <= p.x0 and p.h > 0 and p.w > 0
    assert p.y0 + p.h <= 1 + eps and p.x0 + p.w <= 1 + eps
    ratio = (p.w * width) / (p.h * height)
    assert aspect[0] * (1 - eps) <= ratio <= aspect[1] * (1 + eps)  # also true for the fallback
    if not area[0] * (1 - eps) <= p.h * p.w <= area[1] * (1 + eps):
        # Documented fallback: the largest centred box with the aspect clamped into range.
        assert math.isclose(p.y0, (1 - p.h) / 2, abs_tol=1e-12) and math.isclose(p.x0, (1 - p.w) / 2, abs_tol=1e-12)
        assert math.isclose(max(p.h, p.w), 1.0)
    if not flip:
        assert p.flip is False


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.floats(0.1, 1.0), pad=st.floats(0.0, 0.25), flip=st.booleans())
def test_random_crop_within_padded_image(seed, size, pad, flip):
    p = views.random_crop(np.random.default_rng(seed), size=size, pad=pad, flip=flip)
    assert -pad - 1e-12 <= p.y0 and p.y0 + p.h <= 1 + pad + 1e-12
    assert -pad - 1e-12 <= p.x0 and p.x0 + p.w <= 1 + pad + 1e-12
    assert (p.h, p.w) == (size, size)
    if not flip:
        assert p.flip is False
    if pad == 0.0:
        assert 0 <= p.x0 and p.x0 + p.w <= 1 + 1e-12


def test_flips_happen_half_the_time_only_when_enabled():
    rng = np.random.default_rng(0)
    on = [views.inception_crop(rng, 32, 32).flip for _ in range(2000)]
    off = [views.inception_crop(rng, 32, 32, flip=False).flip for _ in range(500)]
    assert 0.45 < np.mean(on) < 0.55
    assert not any(off)


def test_inception_crop_statistics_match_the_definition():
    # With area <= 0.5 every first attempt fits a square image (side sqrt(0.5 * 4/3) < 1), so the draws are exactly
    # area ~ U(0.05, 0.5) and log-aspect ~ U(log 3/4, log 4/3): compare moments with the analytic ones.
    rng = np.random.default_rng(1)
    ps = [views.inception_crop(rng, 512, 512, area=(0.05, 0.5)) for _ in range(4000)]
    area = np.array([p.h * p.w for p in ps])
    log_ratio = np.log([p.w / p.h for p in ps])
    assert abs(area.mean() - 0.275) < 0.01
    assert abs(area.std() - 0.45 / math.sqrt(12)) < 0.01
    assert abs(log_ratio.mean()) < 0.01
    assert abs(log_ratio.std() - math.log(4 / 3) / math.sqrt(3)) < 0.01


def test_inception_crop_fallback_for_elongated_images():
    # A 1x100 strip cannot hold any box with aspect in (3/4, 4/3) of area >= 5%: fallback after 10 attempts.
    p = views.inception_crop(np.random.default_rng(0), 1, 100, flip=False)
    assert (p.h, p.w) == (1.0, pytest.approx(4 / 3 / 100))
    assert p.x0 == pytest.approx((1 - p.w) / 2) and p.y0 == 0.0


# ------------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    "params,res",
    [
        (views.ViewParams(0.1, 0.2, 0.5, 0.6, False), 32),
        (views.ViewParams(0.1, 0.2, 0.5, 0.6, True), (40, 24)),
        (views.ViewParams(0.0, 0.0, 1.0, 1.0, False), 96),
        (views.ViewParams(0.3, 0.25, 0.1, 0.08, False), 64),  # upsampling a small box
        (views.ViewParams(0.05, 0.0, 0.9, 1.0, True), 300),
    ],
)
def test_render_samples_the_box_analytically(params, res):
    image = coord_image()
    out = views.render(image, params, res, channels=3)
    res_h, res_w = (res, res) if isinstance(res, int) else res
    assert out.shape == (3, res_h, res_w) and out.dtype == np.float32
    # Independent reference: output column j samples source x = x0*W + (j + 0.5) * w*W / res_w (pixel centre i + 0.5).
    j = np.arange(res_w)
    expect_x = params.x0 * 256 + (j + 0.5) * params.w * 256 / res_w - 0.5
    if params.flip:
        expect_x = expect_x[::-1]
    i = np.arange(res_h)
    expect_y = params.y0 * 192 + (i + 0.5) * params.h * 192 / res_h - 0.5
    inner_w, inner_h = slice(res_w // 4, res_w - res_w // 4), slice(res_h // 4, res_h - res_h // 4)
    np.testing.assert_allclose(out[0, res_h // 2, inner_w] * 255, expect_x[inner_w], atol=0.51)
    np.testing.assert_allclose(out[1, inner_h, res_w // 2] * 255, expect_y[inner_h], atol=0.51)
    assert np.all(out[2] == np.float32(128 / 255))
    box, flip = decode_box(out)
    # uint8 rounding of the output biases the fit by up to half a source pixel (0.5 / 192 = 2.6e-3).
    np.testing.assert_allclose(box, [params.y0, params.x0, params.h, params.w], atol=4e-3)
    assert flip == params.flip


def test_render_antialiases_when_downsampling():
    # A 1-pixel checkerboard averages to mid-gray when shrunk 8x; nearest-neighbour sampling would alias to 0 or 1.
    board = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    out = views.render(board, views.plain_resize(), 32, channels=1)
    assert out.shape == (1, 32, 32)
    np.testing.assert_allclose(out, 0.5, atol=0.01)


def test_render_channels():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4
    out = views.render(gray, views.plain_resize(), 8, channels=3)
    assert out.shape == (3, 8, 8)
    np.testing.assert_array_equal(out[0], gray[..., 0] / np.float32(255))
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    luma = views.render(rgb, views.plain_resize(), 4, channels=1)
    np.testing.assert_allclose(luma, 76 / 255)  # ITU-R 601: 0.299 * 255 rounded


def test_render_padded_crop_is_black_outside():
    image = np.full((32, 32, 3), 200, np.uint8)
    out = views.render(image, views.ViewParams(-4 / 32, -4 / 32, 1.0, 1.0), 32)
    np.testing.assert_array_equal(out[:, :4, :], 0.0)
    np.testing.assert_array_equal(out[:, :, :4], 0.0)
    np.testing.assert_allclose(out[:, 5:, 5:], 200 / 255)


def test_render_rejects_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        views.render(np.zeros((4, 4, 3), np.float32), views.plain_resize(), 4)
    with pytest.raises(ValueError, match="shape"):
        views.render(np.zeros((4, 4, 2), np.uint8), views.plain_resize(), 4)


# ------------------------------------------------------------------------------------------------- modes


def test_mode_table():
    assert list(views.MODES) == ["fix/rs", "fix/cc", "fix/ic_ens", "ind/rc", "ind/ic", "same/rc", "same/ic", "fm"]
    assert [m for m, i in views.MODES.items() if i.fixed] == ["fix/rs", "fix/cc", "fix/ic_ens"]
    assert [m for m, i in views.MODES.items() if i.shared] == ["same/rc", "same/ic", "fm"]
    assert [m for m, i in views.MODES.items() if i.mixup] == ["fm"]
    with pytest.raises(ValueError, match=r"mode='same/cc' is not a teacher mode; use one of fix/rs"):
        views.mode_info("same/cc")


def test_draw_views_per_mode():
    rng = np.random.default_rng(0)
    s, t = views.draw_views("fix/rs", rng, 32, 32)
    assert s == t == views.plain_resize()
    s, t = views.draw_views("fix/cc", rng, 32, 32)
    assert t == views.center_crop(0.875) and (s.h, s.w) == (0.875, 0.875)
    s, t = views.draw_views("same/ic", rng, 32, 32)
    assert s is t
    s, t = views.draw_views("ind/ic", rng, 32, 32)
    assert s != t
    a = views.draw_views("fix/ic_ens", rng, 32, 32, index=5, seed=3)[1]
    b = views.draw_views("fix/ic_ens", np.random.default_rng(99), 32, 32, index=5, seed=3)[1]
    assert a == b == views.fixed_teacher_crops(3, 5, 32, 32, 4)[0]
    assert views.fixed_teacher_crops(3, 6, 32, 32, 1)[0] != a
