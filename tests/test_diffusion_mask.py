"""DreamVideo's masked diffusion loss: the subject mask at latent resolution, the target outside it ignored."""

import pytest
import torch

from vgen.diffusion import NoiseSchedule, Parameterization, diffusion_loss
from vgen.diffusion.loss import latent_mask


def pointwise_model(x, t):
    """Each output element depends on its own input element only (so a change outside the mask stays outside)."""
    return 0.7 * x + 1e-3 * t.view(-1, 1, 1, 1, 1)


def _mask(b=2, f=3, h=4, w=4):
    mask = torch.zeros(b, 1, f, h, w)
    mask[..., 1:3, :2] = 1.0
    return mask


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_masked_loss_ignores_the_target_outside_the_mask(prediction):
    param = Parameterization(NoiseSchedule.from_name("linear_sd"), prediction)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=gen), torch.randn(2, 4, 3, 4, 4, generator=gen)
    t, mask = torch.tensor([10, 700]), _mask()
    # the target is noise (eps), x0 (x0) or a mix of both (v): perturb both where the mask is 0, then where it is 1
    outside, inside = 5.0 * (1 - mask), 5.0 * mask

    def loss(x0_, noise_):
        return diffusion_loss(pointwise_model, param, x0_, t=t, noise=noise_, loss_mask=mask)

    base = loss(x0, noise)
    assert torch.equal(loss(x0 + outside, noise - outside), base)
    assert torch.all(loss(x0 + inside, noise - inside) != base)


def test_masked_loss_keeps_the_full_element_count_as_denominator():
    param = Parameterization(NoiseSchedule.from_name("linear_sd"), "eps")
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=gen), torch.randn(2, 4, 3, 4, 4, generator=gen)
    t, mask = torch.tensor([3, 500]), _mask()
    masked = diffusion_loss(pointwise_model, param, x0, t=t, noise=noise, loss_mask=mask)
    error = (pointwise_model(param.q_sample(x0, t, noise), t) - noise).square()
    expected = (error * mask).flatten(1).sum(1) / error[0].numel()  # not / the number of masked elements
    torch.testing.assert_close(masked, expected, rtol=1e-6, atol=0)
    ones = diffusion_loss(pointwise_model, param, x0, t=t, noise=noise, loss_mask=torch.ones_like(mask))
    assert torch.equal(ones, diffusion_loss(pointwise_model, param, x0, t=t, noise=noise))


def test_latent_mask_downsamples_a_pixel_mask_by_nearest_neighbour():
    pixels = torch.zeros(2, 1, 3, 16, 16)
    pixels[..., :, :8] = 1.0  # left half is the subject
    pixels[1, :, 2] = 0.0  # no subject in the last frame of the second clip
    latents = torch.zeros(2, 4, 3, 2, 2, dtype=torch.float64)
    mask = latent_mask(pixels, latents)
    assert mask.shape == (2, 1, 3, 2, 2) and mask.dtype == torch.float64
    assert torch.equal(mask[0, 0, :, :, 0], torch.ones(3, 2, dtype=torch.float64))
    assert torch.equal(mask[0, 0, :, :, 1], torch.zeros(3, 2, dtype=torch.float64))
    assert mask[1, 0, 2].sum() == 0 and mask[1, 0, 1].sum() == 2
    still = latent_mask(pixels[:, :, 0], latents)  # [B, 1, H, W]: one mask for every frame
    assert still.shape == (2, 1, 1, 2, 2)
    assert torch.equal(still.expand_as(mask)[0], mask[0])
    with pytest.raises(ValueError, match=r"mask must be \[B, 1, F, H, W\]"):
        latent_mask(torch.zeros(2, 3, 3, 16, 16), latents)
    with pytest.raises(ValueError, match="mask has 2 frames but the latents 3"):
        latent_mask(torch.zeros(2, 1, 2, 16, 16), latents)


def test_a_mask_that_does_not_broadcast_is_named():
    param = Parameterization(NoiseSchedule.from_name("linear_sd"), "eps")
    with pytest.raises(ValueError, match=r"loss_mask \(2, 1, 3, 16, 16\) does not broadcast .*latent_mask"):
        diffusion_loss(pointwise_model, param, torch.zeros(2, 4, 3, 2, 2), loss_mask=torch.ones(2, 1, 3, 16, 16))
