"""What the network predicts (eps, v or x0) and how to turn its raw output into x0 and eps.

Coefficients are float64 buffers gathered at ``t`` and cast to the input dtype, as in VGen's
``DiffusionDDIM``, and the formulas are the original's (so float32 runs round the same way).
"""

from __future__ import annotations

import torch

from vgen.diffusion.schedules import NoiseSchedule

PREDICTIONS = ("eps", "v", "x0")


class Parameterization:
    """Thin wrapper pairing a :class:`NoiseSchedule` with a prediction type; knows nothing of the network."""

    def __init__(self, schedule: NoiseSchedule, prediction: str):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid choices: {', '.join(PREDICTIONS)}")
        self.schedule = schedule
        self.prediction = prediction

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
        alpha, sigma = self.schedule.scalings(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Regression target of the network: eps, x0, or v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        alpha, sigma = self.schedule.scalings(t, x0)
        return alpha * noise - sigma * x0

    def predict_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 implied by the raw network ``output`` at (x_t, t)."""
        if self.prediction == "eps":
            recip, recipm1 = self.schedule.inverse_scalings(t, x_t)
            return recip * x_t - recipm1 * output
        if self.prediction == "v":
            alpha, sigma = self.schedule.scalings(t, x_t)
            return alpha * x_t - sigma * output
        return output

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = (sqrt(1/ab_t) x_t - x0) / sqrt(1/ab_t - 1); undefined where ab_t is 0 or 1."""
        recip, recipm1 = self.schedule.inverse_scalings(t, x_t)
        return (recip * x_t - x0) / recipm1

    def predict_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps implied by the raw network ``output``, re-derived from x0 as the original sampler does."""
        return self.eps_from_x0(self.predict_x0(output, x_t, t), x_t, t)
