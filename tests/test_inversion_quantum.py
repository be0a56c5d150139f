"""encode_exact's `quantum`: where a step map folds so that the input has no preimage near the solve, the latent
is exact to the data's levels (a step accepted below quantum/4, the round trip verified below it), said in
`info["exact"]`; without `quantum` the same solve is an InversionError; a reachable input stays exact to
round-off with or without it."""

from __future__ import annotations

import math

import pytest
import torch

from probflow.field import DDIMField
from probflow.flows import decode
from probflow.inversion import InversionError, encode_exact

SIGMAS = torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
FOLD_AT, H = 0.5, -0.25  # the last Euler step, σ = 0.5 → 0.25


def _fold_field() -> DDIMField:
    """ε of N(0, I) on every step but the last, whose Euler map is Φ(y) = y − y³/3 (x̄ units): a local maximum
    2/3 at y = 1, so targets just above 2/3 have no preimage near it (the next one lies below y = −2)."""
    def eps(x, sigma):
        s = float(sigma)
        xbar = x * math.sqrt(1 + s * s)
        if abs(s - FOLD_AT) < 1e-12:
            return (-(xbar ** 3) / 3) / H
        return xbar * s / (1 + s * s)
    return DDIMField(eps)


def _x0(value: float) -> torch.Tensor:
    return torch.full((2, 3), value / math.sqrt(1 + 0.25 ** 2), dtype=torch.float64)


def test_folded_step_is_an_error_without_quantum():
    with pytest.raises(InversionError, match=r"σ = 0.5 → 0.25"):
        encode_exact(_fold_field(), _x0(2 / 3 + 1e-4), SIGMAS)


def test_folded_step_is_exact_to_the_levels_with_quantum():
    x0 = _x0(2 / 3 + 1e-4)
    sol = encode_exact(_fold_field(), x0, SIGMAS, quantum=4e-3)
    assert sol.info["exact"] == "quantum"
    assert [c["step"] for c in sol.info["coarse_steps"]] == [2]
    err = (decode(_fold_field(), sol.x, SIGMAS).x - x0).abs().max().item()
    assert 1e-6 < err <= 1e-3  # not round-off (no preimage), but below a quarter level
    assert sol.info["roundtrip_max_abs"] == pytest.approx(err, rel=1e-6)


def test_folded_step_beyond_the_level_is_still_an_error():
    with pytest.raises(InversionError, match="tolerance 1.000e-04"):
        encode_exact(_fold_field(), _x0(2 / 3 + 1e-3), SIGMAS, quantum=4e-4)


def test_reachable_input_stays_exact_to_roundoff_with_quantum():
    x0 = _x0(0.5)
    sol = encode_exact(_fold_field(), x0, SIGMAS, quantum=4e-3)
    assert sol.info["exact"] == "round-off" and sol.info["coarse_steps"] == []
    assert (decode(_fold_field(), sol.x, SIGMAS).x - x0).abs().max().item() < 1e-13


def test_round_trip_above_roundoff_but_below_the_level_is_exact_to_the_levels():
    """Every step solved to round-off, but the verified round trip misses the round-off bound (here a bound of
    1e-18 no float32 decode can meet, no polish): with `quantum` the latent is accepted at the levels and says so;
    without it the same encode is an InversionError. (The trained digits32's heun2 latents needed this: a round
    trip of 1.9e-4 after the polish, far below a quarter of an 8-bit level, was refused.)"""
    x0 = _x0(0.5).float()
    sol = encode_exact(_fold_field(), x0, SIGMAS, quantum=4e-3, verify_tol=1e-18, polish=False)
    assert sol.info["exact"] == "quantum" and sol.info["coarse_steps"] == []
    err = (decode(_fold_field(), sol.x, SIGMAS).x - x0).abs().max().item()
    assert 0 < err <= 1e-3 and sol.info["roundtrip_max_abs"] == pytest.approx(err, rel=1e-6)
    with pytest.raises(InversionError, match="misses x_0"):
        encode_exact(_fold_field(), x0, SIGMAS, verify_tol=1e-18, polish=False)
    with pytest.raises(InversionError, match="misses x_0"):  # a level finer than the round trip: refused
        encode_exact(_fold_field(), x0, SIGMAS, quantum=1e-12, verify_tol=1e-18, polish=False)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "2/255"])
def test_quantum_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="quantum"):
        encode_exact(_fold_field(), _x0(0.5), SIGMAS, quantum=bad)


def test_folded_step_costs_a_bounded_number_of_calls():
    """A step with no preimage near the solve is not ground at for max_iter calls: Anderson hands over once its
    residual has not halved in 16 calls, Newton–Krylov ends once stalled below the level, and no further solve runs
    on a step already below it (the rules before spent 107 calls on this step: Anderson to max_iter, then Newton)."""
    sol = encode_exact(_fold_field(), _x0(2 / 3 + 1e-4), SIGMAS, quantum=4e-3)
    fb = sol.info["newton_fallbacks"]
    assert [f["step"] for f in fb] == [2]
    assert sol.info["iterations"][2] <= 50
