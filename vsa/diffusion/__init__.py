"""Rectified-flow training objective, timestep sampling, ODE samplers with CFG, generation from a
model (`generate`: seeded noise, class labels, guidance), validation."""

from vsa.diffusion.flow import (
    flow_matching_loss,
    interpolate,
    resolution_shift,
    sample_timesteps,
    shift_timesteps,
    timestep_shift,
    velocity_target,
)
from vsa.diffusion.generate import check_sampling, default_labels, generate
from vsa.diffusion.samplers import check_interval, guided_velocity, sample, sample_ode, timestep_grid
from vsa.diffusion.validation import (
    validation_loss,
    validation_losses,
    validation_noise,
    validation_t_grid,
)

__all__ = [
    "check_interval",
    "check_sampling",
    "default_labels",
    "flow_matching_loss",
    "generate",
    "guided_velocity",
    "interpolate",
    "resolution_shift",
    "sample",
    "sample_ode",
    "sample_timesteps",
    "shift_timesteps",
    "timestep_grid",
    "timestep_shift",
    "validation_loss",
    "validation_losses",
    "validation_noise",
    "validation_t_grid",
    "velocity_target",
]
