"""Rectified flow: objective, timestep sampling, sampler orders on an exact flow, CFG, validation."""

from __future__ import annotations

import math

import pytest
import torch

from vsa.diffusion import (
    flow_matching_loss,
    generate,
    guided_velocity,
    interpolate,
    resolution_shift,
    sample,
    sample_ode,
    sample_timesteps,
    shift_timesteps,
    timestep_grid,
    validation_loss,
    validation_losses,
    validation_noise,
    validation_t_grid,
    velocity_target,
)
from vsa.models import build_model

# ---- a Gaussian toy with the exact velocity field ----------------------------------------------
# x0 ~ N(mu, s^2 I). Then x_t = (1 - t) x0 + t eps ~ N((1 - t) mu, var_t I), var_t = (1-t)^2 s^2 + t^2,
# and v(x, t) = E[eps - x0 | x_t = x] = (t - (1 - t) s^2) / var_t * (x - (1 - t) mu) - mu.
# The ODE's flow map is x_t = (1 - t) mu + sqrt(var_t) * x_1, so x_1 = z lands exactly on mu + s z.

MU, S = 0.7, 0.5


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.double().reshape(-1, *([1] * (x.dim() - 1)))
    a = 1 - t
    var = a * a * S * S + t * t
    return ((t - a * S * S) / var * (x.double() - a * MU) - MU).float()


def toy_error(method: str, steps: int) -> float:
    z = torch.linspace(-2.0, 2.0, 9).reshape(9, 1)
    x0 = sample_ode(exact_velocity, z, steps=steps, method=method)
    return (x0 - (MU + S * z)).abs().max().item()


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_sampler_convergence_order(method, order):
    errors = [toy_error(method, n) for n in (32, 64, 128)]
    for coarse, fine in zip(errors, errors[1:], strict=False):
        rate = math.log2(coarse / fine)  # halving the step divides the error by 2^order
        assert abs(rate - order) < 0.1, (method, errors)
    assert toy_error("heun", 32) < toy_error("euler", 32) / 10


def test_unipc_is_diffusers_second_order_solver():
    """method 'unipc' (diffusers' UniPC with flow sigmas, Wan's pipeline scheduler) converges at
    about second order on the exact flow, at one evaluation per step, also with a shift."""
    pytest.importorskip("diffusers")
    errors = [toy_error("unipc", n) for n in (32, 64, 128)]
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 1.8 < math.log2(coarse / fine) < 2.7, errors
    assert errors[0] < toy_error("euler", 32) / 10
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    calls = []
    velocity = lambda x, t: calls.append(t) or exact_velocity(x, t)
    # 400 steps: diffusers' integer timesteps repeat; the solver must still step by position.
    x0 = sample_ode(velocity, z, steps=400, method="unipc", shift=3.0)
    torch.testing.assert_close(x0, MU + S * z, rtol=0, atol=1e-4)
    assert len(calls) == 400 and abs(calls[0][0] - 1) < 1e-5 and 0 < calls[-1][0] < 0.02  # t from 1 toward 0
    with pytest.raises(ValueError, match="own time grid"):
        sample_ode(exact_velocity, z, steps=4, method="unipc", t_grid=torch.linspace(1, 0, 5))


def test_sampler_with_shifted_grid_still_converges():
    z = torch.randn(5, 3)
    x0 = sample_ode(exact_velocity, z, steps=200, method="heun", shift=3.0)
    torch.testing.assert_close(x0, MU + S * z, rtol=0, atol=1e-4)


# ---- objective and timesteps -------------------------------------------------------------------

def test_interpolation_and_target():
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = interpolate(x0, noise, t)
    # the target is the time derivative of the path
    dt = 1e-3
    torch.testing.assert_close((interpolate(x0, noise, t + dt) - x_t) / dt,
                               velocity_target(x0, noise), rtol=1e-3, atol=1e-3)


def test_loss_is_zero_for_the_exact_target_and_mse_otherwise():
    x0, noise, t = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4)
    perfect = lambda x_t, t_: noise - x0
    assert flow_matching_loss(perfect, x0, t, noise).item() == 0.0
    zero = lambda x_t, t_: torch.zeros_like(x_t)
    torch.testing.assert_close(flow_matching_loss(zero, x0, t, noise), (noise - x0).square().mean())


def test_logit_normal_timesteps_and_shift():
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, generator=gen)
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.02
    u = torch.logit(t.double())
    assert abs(u.std().item() - 1.0) < 0.03
    shifted = sample_timesteps(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert abs(shifted.median().item() - 0.75) < 0.02  # 3 * 0.5 / (1 + 2 * 0.5)
    torch.testing.assert_close(shift_timesteps(t, 3.0), shifted)
    assert resolution_shift(16384, base_seq_len=4096) == 2.0
    assert resolution_shift(512, base_seq_len=4096) == 1.0  # never below 1 (docs/sample_quality.md)
    grid = timestep_grid(4, shift=2.0)
    assert grid[0] == 1 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_timesteps(t, 0.0)


# ---- classifier-free guidance and sampling with the model --------------------------------------

def small_model(**overrides):
    torch.manual_seed(0)
    model = build_model("0.6M", in_channels=4, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_guidance_combines_cond_and_uncond():
    model = small_model(num_classes=3)
    x, t, labels = torch.randn(2, 4, 4, 8, 8), torch.rand(2), torch.tensor([0, 2])
    cond = {"labels": labels}
    uncond = model.null_condition(cond)
    v_c, v_u = model(x, t, **cond), model(x, t, **uncond)
    guided = guided_velocity(model, cond, uncond, scale=4.0)(x, t)
    torch.testing.assert_close(guided, v_u + 4.0 * (v_c - v_u), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided_velocity(model, cond, uncond, 1.0)(x, t), v_c)
    with pytest.raises(ValueError, match="same keys"):
        guided_velocity(model, cond, {}, 2.0)


def test_autoguidance_takes_the_reference_from_a_weaker_model():
    """guide=: v = v_g + scale * (v_c - v_g), both under the condition (Karras et al. 2024); the
    model guiding itself is the plain conditional velocity; it replaces uncond, and a guide of
    another kind is refused with the fix."""
    model = small_model(num_classes=3)
    torch.manual_seed(1)
    weak = build_model("0.6M", in_channels=4, num_classes=3).eval()
    with torch.no_grad():
        for p in weak.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, cond = torch.randn(2, 4, 4, 8, 8), torch.rand(2), {"labels": torch.tensor([0, 2])}
    v_c, v_g = model(x, t, **cond), weak(x, t, **cond)
    assert (v_c - v_g).abs().max() > 1e-3
    guided = guided_velocity(model, cond, None, 2.5, guide=weak)(x, t)
    torch.testing.assert_close(guided, v_g + 2.5 * (v_c - v_g), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided_velocity(model, cond, None, 2.5, guide=model)(x, t), v_c,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        guided_velocity(model, cond, model.null_condition(cond), 2.5, guide=weak)
    other = build_model("0.6M", in_channels=4, num_classes=5)
    with pytest.raises(ValueError, match="differs from the model in num_classes"):
        generate(model, (4, 4, 8, 8), 2, labels=[0, 1], steps=2, guide=other)
    # through generate: guided by itself, the videos are the unguided ones (cfg_scale 1)
    plain = generate(model, (4, 4, 8, 8), 2, labels=[0, 1], steps=3, cfg_scale=1.0)
    torch.testing.assert_close(generate(model, (4, 4, 8, 8), 2, labels=[0, 1], steps=3, cfg_scale=3.0, guide=model),
                               plain, rtol=1e-5, atol=1e-5)
    weak.train()  # generate samples in eval mode and gives each model its mode back
    guided_videos = generate(model, (4, 4, 8, 8), 2, labels=[0, 1], steps=3, cfg_scale=3.0, guide=weak)
    assert (guided_videos - plain).abs().max() > 1e-3 and weak.training and not model.training


def test_guidance_interval_guides_only_inside_it():
    model = small_model(num_classes=3)
    x, labels = torch.randn(3, 4, 4, 8, 8), torch.tensor([0, 2, 1])
    cond = {"labels": labels}
    uncond = model.null_condition(cond)
    t = torch.tensor([0.1, 0.5, 0.9])  # below, inside, above [0.3, 0.7]
    v_c, v_u = model(x, t, **cond), model(x, t, **uncond)
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    guided = guided_velocity(model, cond, uncond, 4.0, interval=(0.3, 0.7))(x, t)
    torch.testing.assert_close(guided[1], (v_u + 4.0 * (v_c - v_u))[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided[[0, 2]], v_c[[0, 2]], rtol=1e-5, atol=1e-5)
    # a call with no time inside the interval runs the conditional branch alone (one batch of 3)
    calls.clear()
    out = guided_velocity(model, cond, uncond, 4.0, interval=(0.3, 0.7))(x, torch.full((3,), 0.2))
    assert calls == [3]
    torch.testing.assert_close(out, model(x, torch.full((3,), 0.2), **cond))
    # (0, 1) is every step: the plain guided velocity
    torch.testing.assert_close(guided_velocity(model, cond, uncond, 4.0, interval=(0.0, 1.0))(x, t),
                               guided_velocity(model, cond, uncond, 4.0)(x, t))
    for bad in ((0.7, 0.3), (-0.1, 0.5), (0.2,), "ab"):
        with pytest.raises(ValueError, match="cfg_interval"):
            guided_velocity(model, cond, uncond, 4.0, interval=bad)


def test_sample_runs_and_restores_mode():
    model = small_model(num_classes=3)
    model.train()
    noise = torch.randn(2, 4, 4, 8, 8)
    out = sample(model, noise, {"labels": torch.tensor([0, 1])}, steps=3, method="heun",
                 cfg_scale=3.0)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert model.training
    with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
        sample_ode(exact_velocity, noise, steps=2, method="rk4")


def test_text_model_sampling_with_guidance():
    model = small_model(text_dim=16)
    noise, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 5, 16)
    out = sample(model, noise, {"text": text, "text_mask": torch.ones(1, 5, dtype=torch.bool)},
                 steps=2, cfg_scale=2.0)
    assert out.shape == noise.shape


# ---- validation protocol -----------------------------------------------------------------------

class ZeroVelocity(torch.nn.Module):
    """A parameter-free model predicting zero velocity."""

    def forward(self, x, t, **cond):
        return torch.zeros_like(x)


def test_validation_loss_is_deterministic_and_comparable():
    model = small_model(num_classes=3, cond_dropout=0.5)
    model.train()  # the protocol switches to eval (no condition dropout) and back
    x0, cond = torch.randn(4, 4, 4, 8, 8), {"labels": torch.tensor([0, 1, 2, 0])}
    first = validation_loss(model, x0, cond)
    assert first == validation_loss(model, x0, cond)
    assert model.training
    chunked = validation_loss(model, x0, cond, batch_size=3)
    assert abs(chunked - first) < 1e-6 * first
    assert validation_loss(model, x0, cond, seed=1) != first
    per_t = validation_losses(model, x0, cond, n_t=4)
    assert per_t.shape == (4,) and torch.isfinite(per_t).all()
    torch.testing.assert_close(validation_t_grid(4), torch.tensor([0.125, 0.375, 0.625, 0.875],
                                                                  dtype=torch.float64))


def test_validation_loss_of_zero_model_uses_fixed_noise():
    """A zero-velocity model scores mean_i E[(eps_i - x0)^2] over the protocol's fixed noise."""
    x0 = torch.randn(3, 4, 2, 4, 4)
    expected = sum((validation_noise(x0.shape, 7, i) - x0).double().square().mean().item()
                   for i in range(5)) / 5
    assert abs(validation_loss(ZeroVelocity(), x0, seed=7, n_t=5) - expected) < 1e-9
