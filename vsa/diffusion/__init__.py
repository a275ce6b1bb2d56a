"""Rectified-flow training objective, timestep sampling, ODE samplers with CFG, validation."""

from vsa.diffusion.flow import (
    flow_matching_loss,
    interpolate,
    resolution_shift,
    sample_timesteps,
    shift_timesteps,
    velocity_target,
)
from vsa.diffusion.samplers import guided_velocity, sample, sample_ode, timestep_grid
from vsa.diffusion.validation import (
    validation_loss,
    validation_losses,
    validation_noise,
    validation_t_grid,
)

__all__ = [
    "flow_matching_loss",
    "guided_velocity",
    "interpolate",
    "resolution_shift",
    "sample",
    "sample_ode",
    "sample_timesteps",
    "shift_timesteps",
    "timestep_grid",
    "validation_loss",
    "validation_losses",
    "validation_noise",
    "validation_t_grid",
    "velocity_target",
]
