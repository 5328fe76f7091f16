"""A redshift is a shift on the logarithmic grid: the augmentation that shifts a spectrum gives the
same spectrum observed at the redshift it claims, drawn reproducibly; the shift z head moves its
bins with the spectrum; the z head's probability read-out computes what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectransfer.config import DEFAULT_GRID as GRID
from spectransfer.data.resample import normalise
from spectransfer.errors import TrainError
from spectransfer.ml import refine
from spectransfer.ml.dataset import redshift_augment, redshift_shift, redshift_shift_draws
from spectransfer.ml.models import (
    Z_MAX,
    ModelConfig,
    ShiftZHead,
    build_model,
    forward_outputs,
    load_init_weights,
    redshift_from_head,
    redshift_probability,
    shift_z_bins,
)
from spectransfer.templates import load_templates

COEF = np.array([1.0, 0.15, -0.08, 0.05])


def _template_on_grid(z: float) -> np.ndarray:
    """The DR16Q quasar template at ``z``, point-sampled at the grid's rest wavelengths."""
    t = load_templates()["qso_loz" if z < refine.Z_SPLIT else "qso_hiz"]
    rest = np.log10(GRID.centers) - np.log10(1 + z)
    return np.array([np.interp(rest, t.loglam, b) for b in t.basis]).T @ COEF


@pytest.mark.parametrize("z, k", [(2.0, 180), (2.4, -220), (1.7, 1)])
def test_shift_is_the_template_observed_at_the_claimed_redshift(z: float, k: int) -> None:
    n = GRID.n_bins
    x, _ = normalise(_template_on_grid(z), np.ones(n))
    shifted, z_new = redshift_shift(
        torch.from_numpy(x)[None, None, :], torch.tensor([z], dtype=torch.float64), torch.tensor([k]), GRID.log_step
    )
    z_claim = float(z_new[0])
    assert z_claim == pytest.approx((1 + z) * 10 ** (k * GRID.log_step) - 1, rel=1e-12)
    # the reference: the template sampled directly at z', over the bins the shifted one covers,
    # normalised by the store's own function (bins outside the coverage have no data)
    covered = (np.arange(n) - k >= 0) & (np.arange(n) - k < n)
    ref, _ = normalise(_template_on_grid(z_claim), covered.astype(float))
    np.testing.assert_allclose(shifted[0, 0].numpy(), ref, atol=2e-5)
    assert (shifted[0, 0].numpy()[~covered] == 0).all()
    assert shifted[0, 0].max() == pytest.approx(1.0) and shifted[0, 0].min() == pytest.approx(-1.0)


def test_two_channel_rows_shift_together_and_keep_the_ivar_scale() -> None:
    rng = np.random.default_rng(3)
    flux, ivar = normalise(rng.normal(size=(3, 64)), rng.uniform(0.5, 2.0, size=(3, 64)))
    w = np.sqrt(ivar) / np.sqrt(ivar).max(axis=1, keepdims=True)
    x = torch.from_numpy(np.stack([flux, w.astype(np.float32)], axis=1))
    out, _ = redshift_shift(x, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5, -7, 0]), GRID.log_step)
    np.testing.assert_allclose(out[2].numpy(), x[2].numpy(), atol=1e-6)  # no shift: normalised already
    sw = np.zeros(64)
    sw[5:] = w[0, :-5]
    np.testing.assert_allclose(out[0, 1].numpy(), sw / sw.max(), rtol=1e-6)
    assert (out[1, :, -7:] == 0).all() and (out[0, :, :5] == 0).all()


def test_draws_are_reproducible_bounded_and_keep_z_in_range() -> None:
    z = np.array([0.01, 0.5, 2.0, 6.95] * 250)
    a = redshift_shift_draws(z, 256, GRID.log_step, Z_MAX, np.random.default_rng([4, 1]))
    b = redshift_shift_draws(z, 256, GRID.log_step, Z_MAX, np.random.default_rng([4, 1]))
    c = redshift_shift_draws(z, 256, GRID.log_step, Z_MAX, np.random.default_rng([4, 2]))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert np.abs(a).max() <= 256 and a.min() == -256 and a.max() == 256
    z_new = (1 + z) * 10 ** (a * GRID.log_step) - 1
    assert z_new.min() >= -1e-12 and z_new.max() <= Z_MAX + 1e-9
    assert (a[z == 0.01] >= -np.floor(np.log10(1.01) / GRID.log_step)).all()


def test_augment_copies_only_rows_with_a_redshift_and_is_seeded() -> None:
    x = torch.from_numpy(normalise(np.random.default_rng(0).normal(size=(5, GRID.n_bins)), np.ones((5, GRID.n_bins)))[0])
    x = x[:, None, :]
    z = torch.tensor([np.nan, 1.0, np.nan, 2.5, 0.3])
    xa, za = redshift_augment(x, z, 200, GRID.log_step, Z_MAX, [0, 7])
    xb, zb = redshift_augment(x, z, 200, GRID.log_step, Z_MAX, [0, 7])
    assert xa.shape == (3, 1, GRID.n_bins) and torch.equal(xa, xb) and torch.equal(za, zb)
    shifts = np.rint(np.log10((1 + za.double().numpy()) / (1 + np.array([1.0, 2.5, 0.3]))) / GRID.log_step).astype(int)
    for i, row in enumerate((1, 3, 4)):
        ref, _ = redshift_shift(x[row : row + 1], z[row : row + 1], torch.tensor([shifts[i]]), GRID.log_step)
        assert torch.equal(xa[i], ref[0])
    none_x, none_z = redshift_augment(x, torch.full((5,), float("nan")), 200, GRID.log_step, Z_MAX, 1)
    assert none_x.shape[0] == 0 and none_z.shape[0] == 0


def test_redshift_probability_equals_a_monte_carlo_of_the_velocity_offset() -> None:
    n = 300
    edges = np.linspace(0.0, np.log1p(Z_MAX), n + 1)
    logits = np.full((2, n), -60.0)
    logits[0, [100, 101, 250]] = np.log([0.6, 0.3, 0.1])
    logits[1, [40, 41, 42]] = np.log([0.2, 0.5, 0.3])
    z = np.array([np.expm1(0.5 * (edges[100] + edges[101])), np.expm1(edges[41] + 0.3 * (edges[42] - edges[41]))])
    got = redshift_probability(logits, z)
    # independent reference: draw true redshifts from the distribution (uniform in ln(1+z) inside
    # each bin) and count the draws within 3000 km/s by the velocity offset's own definition
    rng = np.random.default_rng(5)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for i in range(2):
        b = rng.choice(n, size=400_000, p=p[i])
        z_true = np.expm1(rng.uniform(edges[b], edges[b + 1]))
        within = np.abs(refine.velocity_offset_kms(np.full(b.size, z[i]), z_true)) <= 3000.0
        assert got[i] == pytest.approx(within.mean(), abs=3e-3)
    assert redshift_probability(logits[1:], z[1:], half_width_kms=1e5)[0] == pytest.approx(1.0)


def test_shift_head_moves_its_redshift_bins_with_the_spectrum() -> None:
    """Fresh weights have zero biases, so zeros stay zeros through the trunk: 32 grid bins of
    shift are then exactly one trunk position, i.e. PHASES z bins of the shift head."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_bins=GRID.n_bins, z_bins=shift_z_bins(GRID.log_step), z_head_kind="shift")).eval()
    x = torch.zeros(2, 1, GRID.n_bins)
    x[:, 0, 400:1400] = torch.randn(2, 1000)
    with torch.no_grad():
        z0 = forward_outputs(model, x)["z_logits"]
        z2 = forward_outputs(model, torch.roll(x, 2 * 32, dims=2))["z_logits"]
    step = 2 * ShiftZHead.PHASES
    torch.testing.assert_close(z2[:, step:], z0[:, :-step], rtol=0, atol=1e-5)
    assert (z2 - z0).abs().max() > 1e-3  # and the logits did move
    # the bins cover 0-7 in ln(1+z), each 16 grid bins wide to 0.1%
    width = np.log1p(Z_MAX) / z0.shape[1]
    assert width == pytest.approx(16 * GRID.log_step * np.log(10), rel=1e-3)


def test_shift_head_equals_a_direct_sum_over_positions() -> None:
    torch.manual_seed(1)
    head = ShiftZHead(channels=8, positions=6, hidden=5, z_bins=10)
    f = torch.randn(3, 8, 6)
    with torch.no_grad():
        got = head(f) - head.prior
        h = torch.relu(head.mix(f)).numpy()
        w = head.pattern.numpy()
    want = np.zeros((3, 10))
    for j in range(5):
        for phase in range(2):
            want[:, 2 * j + phase] = sum(h[:, :, p] @ w[phase, :, 6 - 1 + j - p] for p in range(6))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_old_dense_head_configs_load_and_a_dense_init_gives_a_fresh_shift_head() -> None:
    old = ModelConfig.from_dict({"name": "vgg-a", "n_bins": 256, "in_channels": 1, "z_bins": 300, "z_hidden": 256})
    assert old.z_head_kind == "dense"
    dense = build_model(old)
    torch.manual_seed(3)
    new = build_model(ModelConfig(n_bins=256, z_bins=40, z_head_kind="shift"))
    before = {k: v.clone() for k, v in new.state_dict().items() if k.startswith("z_head.")}
    fresh = load_init_weights(new, dense.state_dict(), "dense-run")
    assert sorted(fresh) == sorted(before)
    for k, v in dense.state_dict().items():
        if not k.startswith("z_head."):
            torch.testing.assert_close(new.state_dict()[k], v, rtol=0, atol=0)
    for k, v in before.items():
        torch.testing.assert_close(new.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(TrainError, match="even number"):
        ModelConfig(n_bins=256, z_bins=41, z_head_kind="shift")


def test_z_err_is_the_half_width_holding_68_percent() -> None:
    n = 300
    edges = np.linspace(0.0, np.log1p(Z_MAX), n + 1)
    width = edges[1] - edges[0]
    one = np.full(n, -60.0)
    one[120] = 0.0  # all the mass in one bin: 68% lie within 0.68 half-widths of its centre
    split = np.full(n, -60.0)
    split[[50, 200]] = np.log([0.6, 0.4])  # the mode holds 60%: the interval must reach bin 200
    z, z_err = redshift_from_head(np.stack([one, split]))
    u0 = 0.5 * (edges[120] + edges[121])
    assert z[0] == pytest.approx(np.expm1(u0))
    assert z_err[0] == pytest.approx((1 + z[0]) * np.sinh(0.68 * width / 2), rel=1e-6)
    # direct: 60% in bin 50 in full, and 8/40 of bin 200 (uniform in it), from the near edge
    u50 = 0.5 * (edges[50] + edges[51])
    r = edges[200] + 0.2 * width - u50
    assert z_err[1] == pytest.approx((1 + z[1]) * np.sinh(r), rel=1e-6)
