"""ODE samplers for rectified flow: integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data).

Euler is first order in the step size, Heun (Euler predictor + trapezoidal corrector, applied on
every step including the last: the flow's velocity is defined at t = 0) is second order, at two
velocity evaluations per step. UniPC (diffusers' `UniPCMultistepScheduler` with flow sigmas, the
scheduler of diffusers' Wan pipeline; needs the `diffusers` extra) is a multistep predictor-corrector
at one evaluation per step, accurate in few steps. Classifier-free guidance combines a conditional and an
unconditional velocity: v = v_u + scale * (v_c - v_u), both from one batched model call; with an
`interval` (t_lo, t_hi) only at times t_lo <= t <= t_hi, and v = v_c elsewhere (guidance in a limited
interval, Kynkäänniemi et al. 2024: guiding the last, low-noise steps breaks fine structure apart).
Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself") takes
the reference velocity from a weaker `guide` model (an early checkpoint of the same run, say) under
the same condition: v = v_g + scale * (v_c - v_g).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vsa.diffusion.flow import shift_timesteps

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, ...], t [B]) -> v
METHODS = ("euler", "heun", "unipc")


def timestep_grid(steps: int, shift: float = 1.0, device: torch.device | str | None = None
                  ) -> torch.Tensor:
    """Times t_0 = 1 > t_1 > ... > t_steps = 0 (uniform, then shifted like training times)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).to(device)


def check_interval(interval) -> tuple[float, float] | None:
    """A guidance interval as (t_lo, t_hi) floats with 0 <= t_lo <= t_hi <= 1, or None (always)."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"cfg_interval must be two times [t_lo, t_hi] in [0, 1] (guidance only at "
                         f"t_lo <= t <= t_hi; t = 1 is noise), or null for every step; got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval must satisfy 0 <= t_lo <= t_hi <= 1 (t = 1 is noise), got {interval!r}")
    return lo, hi


def guided_velocity(model: nn.Module, cond: dict, uncond: dict | None = None,
                    scale: float = 1.0, interval: tuple[float, float] | None = None,
                    guide: nn.Module | None = None) -> VelocityFn:
    """Velocity function of `model` under classifier-free guidance with weight `scale`.

    `cond` / `uncond` are keyword arguments of the model (e.g. labels, text, text_mask) with the
    same keys; with `uncond=None` or `scale=1` the model is called once on `cond` alone. With
    `guide` (autoguidance, instead of `uncond`), the reference velocity is the guide model's under
    `cond`: v = v_g + scale * (v_c - v_g). With `interval` = (t_lo, t_hi), guidance applies only to
    samples whose t is in [t_lo, t_hi]; a call where no t is inside runs the conditional branch
    alone. The state is cast to each model's parameter dtype for its call (the sampler keeps it
    in fp32).
    """
    interval = check_interval(interval)

    def dtype_of(module: nn.Module) -> torch.dtype | None:
        param = next(module.parameters(), None)
        return None if param is None else param.dtype

    dtype = dtype_of(model)
    if uncond is not None and set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and "
                         f"{sorted(uncond)} (use model.null_condition(cond))")
    if guide is not None and uncond is not None:
        raise ValueError("give uncond (classifier-free guidance) or guide (autoguidance), not both")
    guide_dtype = None if guide is None else dtype_of(guide)

    def cast(x: torch.Tensor, to: torch.dtype | None) -> torch.Tensor:
        return x if to is None else x.to(to)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inside = None if interval is None else (t >= interval[0]) & (t <= interval[1])
        if (uncond is None and guide is None) or scale == 1.0 or (inside is not None and not bool(inside.any())):
            return model(cast(x, dtype), t, **cond)
        if guide is not None:
            v_c = model(cast(x, dtype), t, **cond).float()
            v_u = guide(cast(x, guide_dtype), t, **cond).float()
        else:
            x = cast(x, dtype)
            both = {k: None if cond[k] is None else torch.cat([cond[k], uncond[k]]) for k in cond}
            v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), **both).float().chunk(2)
        guided = v_u + scale * (v_c - v_u)
        if inside is None:
            return guided
        return torch.where(inside.view(-1, *([1] * (guided.dim() - 1))), guided, v_c)

    return velocity


def sample_ode(velocity: VelocityFn, noise: torch.Tensor, steps: int = 50, method: str = "euler",
               shift: float = 1.0, t_grid: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate from `noise` at t = 1 to t = 0 with `steps` Euler or Heun steps.

    `t_grid` (decreasing from 1 to 0) replaces the default `timestep_grid(steps, shift)`.
    The state is kept in fp32; `velocity` receives x in fp32 and t as a [B] fp32 tensor.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {METHODS}")
    if method == "unipc":
        if t_grid is not None:
            raise ValueError("method 'unipc' makes its own time grid (steps, shift); t_grid is for euler/heun")
        return sample_unipc(velocity, noise, steps, shift)
    grid = timestep_grid(steps, shift) if t_grid is None else t_grid.to(torch.float64).cpu()
    if grid.dim() != 1 or grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("t_grid must be a 1-D strictly decreasing sequence of >= 2 times (1 -> 0)")
    x = noise.float()
    batch = x.shape[0]

    def v_at(x: torch.Tensor, t: float) -> torch.Tensor:
        return velocity(x, torch.full((batch,), t, device=x.device, dtype=torch.float32)).float()

    for t_cur, t_next in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
        dt = t_next - t_cur  # negative: we move from noise to data
        v = v_at(x, t_cur)
        if method == "euler":
            x = x + dt * v
        else:
            x_pred = x + dt * v
            x = x + 0.5 * dt * (v + v_at(x_pred, t_next))
    return x


def sample_unipc(velocity: VelocityFn, noise: torch.Tensor, steps: int = 50, shift: float = 1.0,
                 order: int = 2) -> torch.Tensor:
    """Integrate from `noise` at t = 1 to t = 0 with diffusers' UniPC multistep solver (flow
    sigmas, `flow_shift=shift`, `solver_order=order`): Wan's pipeline scheduler with its settings
    (bh2 corrector, x0 prediction). The state is kept in fp32; `velocity` gets t = sigma in [0, 1]."""
    try:
        from diffusers import UniPCMultistepScheduler
    except ImportError as exc:
        raise ImportError("method 'unipc' uses diffusers' UniPCMultistepScheduler: pip install -e '.[diffusers]' "
                          "(or sample with method=euler|heun)") from exc
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=float(shift), solver_order=order,
                                        solver_type="bh2", predict_x0=True)
    scheduler.set_timesteps(steps, device=noise.device)
    # Step by position: its integer timesteps repeat at many steps with a shift, and a lookup of
    # the first one would start at the wrong step.
    scheduler.set_begin_index(0)
    x = noise.float()
    batch = x.shape[0]
    for i, timestep in enumerate(scheduler.timesteps):
        t = torch.full((batch,), float(scheduler.sigmas[i]), device=x.device, dtype=torch.float32)
        x = scheduler.step(velocity(x, t).float(), timestep, x, return_dict=False)[0]
    return x


@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, cond: dict | None = None, steps: int = 50,
           method: str = "euler", cfg_scale: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Generate x0 [B, C, T, H, W] from `noise` with a VideoDiT (eval mode), guided if scale != 1.

    The unconditional branch comes from `model.null_condition(cond)`.
    """
    cond = cond or {}
    uncond = model.null_condition(cond) if cfg_scale != 1.0 else None
    was_training = model.training
    model.eval()
    try:
        return sample_ode(guided_velocity(model, cond, uncond, cfg_scale), noise, steps, method,
                          shift)
    finally:
        model.train(was_training)
