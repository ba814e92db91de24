"""The DreamBooth objective (paper Sec. 3.3, Eq. 2) with optional Min-SNR-gamma weighting and offset noise.

Prior-preservation loss, with x = instance latents, c = "a [V] dog", x' = class latents,
c_pr = "a dog", and lambda = prior_loss_weight:

    L = E_{x,c,eps,t} [ w_t || x_hat(alpha_t x + sigma_t eps, c) - x ||^2
                        + lambda * w_t' || x_hat(alpha_t' x' + sigma_t' eps', c_pr) - x' ||^2 ]

Stable Diffusion predicts eps (or v) instead of x, so the squared error is taken against
`diffusion_target` (the usual eps-parameterisation of the same objective). Flow-matching families
(FLUX.1) noise along a straight line, x_s = (1 - s) x + s eps, and predict the velocity eps - x
(`flow_matching_pair`); the loss keeps the same two halves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported: use 'epsilon' or 'v_prediction'")


def flow_matching_pair(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_s = (1 - s) x + s eps, target eps - x) for one sigma s per row (rectified flow, as FLUX.1 was trained)."""
    s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1 - s) * latents + s * noise, noise - latents


def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights, one per timestep (Hang et al., ICCV 2023).

    The paper weights the x_0-space error by min(SNR_t, gamma). An eps-error equals SNR_t times the
    x_0-error, and a v-error (SNR_t + 1) times it, so the weight on our MSE is
    min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v (as in diffusers' scripts).
    """
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported: use 'epsilon' or 'v_prediction'")


def _weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    per_example = F.mse_loss(pred, target, reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if weights is not None:
        per_example = per_example * weights
    return per_example.mean()


def dreambooth_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor | None = None,
    *,
    noise_scheduler=None,
    with_prior: bool,
    prior_loss_weight: float,
    snr_gamma: float | None = None,
    weighting: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Eq. 2 from one denoiser pass over the batch [instance rows; class rows] (see collate_examples).

    Row weights w: Min-SNR-gamma of each row's DDPM timestep (snr_gamma), or the family's `weighting`
    (flow matching: compute_loss_weighting_for_sd3 of each row's sigma), or none. Each half is weighted
    with its OWN rows' weights: diffusers' scripts once weighted the instance half with all 2B timesteps'
    Min-SNR weights, mixing in the class rows' noise levels (their flow-matching scripts chunked the
    weighting only in 2026, PR #13743). The logged parts are detached tensors, not floats: reading a GPU
    value stalls the host, so the caller does it once per step.
    """
    pred, target = model_pred.float(), target.float()  # fp32 loss even under fp16/bf16 autocast
    if snr_gamma is not None:
        weighting = snr_weights(noise_scheduler, timesteps, snr_gamma, noise_scheduler.config.prediction_type)
    if not with_prior:
        loss = _weighted_mse(pred, target, weighting)
        return loss, {"instance_loss": loss.detach(), "prior_loss": torch.zeros_like(loss.detach())}
    if pred.shape[0] % 2:
        raise ValueError(f"with_prior needs an even batch [instance; class], got {pred.shape[0]} rows")
    pred_inst, pred_prior = pred.chunk(2)
    target_inst, target_prior = target.chunk(2)
    w_inst, w_prior = weighting.chunk(2) if weighting is not None else (None, None)
    instance_loss = _weighted_mse(pred_inst, target_inst, w_inst)
    prior_loss = _weighted_mse(pred_prior, target_prior, w_prior)
    loss = instance_loss + prior_loss_weight * prior_loss
    return loss, {"instance_loss": instance_loss.detach(), "prior_loss": prior_loss.detach()}


def sample_noise(latents: torch.Tensor, offset_noise: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """eps ~ N(0, I), plus offset noise: strength * one N(0, 1) value per (image, channel).

    The offset shifts whole channels, which plain eps almost never does, so the model learns to
    change overall brightness (very dark or bright images); Guttenberg 2023, "Diffusion with Offset Noise".
    """
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset_noise:
        shape = (latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2)
        noise = noise + offset_noise * randn_tensor(shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return noise
