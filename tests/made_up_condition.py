"""A condition the framework has never heard of, for tests/test_conditions.py: the whole of its code."""

import torch
from torch import nn

from vgen.models.conditions import Condition


class Brightness(Condition):
    """A clip's mean pixel value, a per-clip scalar added to the timestep embedding through an MLP."""

    routes = ("embedding",)

    def __init__(self, dims, **kwargs):
        super().__init__(**kwargs)
        self.mlp = nn.Sequential(nn.Linear(1, dims.embed_dim), nn.SiLU(), nn.Linear(dims.embed_dim, dims.embed_dim))
        self.seen: list[torch.Tensor] = []  # the values it was given, for the test

    def extract(self, inputs):
        video = inputs.batch.get("video")
        return None if video is None else video.float().mean(dim=(1, 2, 3, 4))

    def forward(self, value, num_frames):
        self.seen.append(value.detach().clone())
        return self.mlp(value.reshape(-1, 1).to(self.mlp[0].weight.dtype))

    def example(self, batch_size, num_frames, height, width, dtype=torch.float32):
        return torch.rand(batch_size, dtype=dtype)
