"""The DreamBooth loss on tiny hand-computed examples.

Schedule used throughout: betas (0.36, 0.4375) -> alpha_bar = (0.64, 0.36), so
sqrt(abar) = (0.8, 0.6), sqrt(1 - abar) = (0.6, 0.8), SNR = (16/9, 9/16).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth_lib.loss import diffusion_target, dreambooth_loss, sample_noise, snr_weights


def scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=2, trained_betas=[0.36, 0.4375], prediction_type=prediction_type)


def rows(*values) -> torch.Tensor:
    """Each argument is one example's 2 numbers, shaped like latents [N, C=1, H=1, W=2]."""
    return torch.tensor(values, dtype=torch.float32).view(len(values), 1, 1, 2)


def test_epsilon_target_is_the_noise():
    noise = rows([3, -1], [1, 1])
    assert torch.equal(diffusion_target(scheduler(), rows([1, 2], [1, 0]), noise, torch.tensor([0, 1])), noise)


def test_v_target_hand_computed():
    # v = sqrt(abar) eps - sqrt(1 - abar) x0
    # t=0: 0.8*[3,-1] - 0.6*[1,2] = [1.8, -2.0];  t=1: 0.6*[1,1] - 0.8*[1,0] = [-0.2, 0.6]
    v = diffusion_target(scheduler("v_prediction"), rows([1, 2], [1, 0]), rows([3, -1], [1, 1]), torch.tensor([0, 1]))
    torch.testing.assert_close(v, rows([1.8, -2.0], [-0.2, 0.6]))


def test_unknown_prediction_type_raises():
    with pytest.raises(ValueError, match="sample"):
        diffusion_target(scheduler("sample"), rows([1, 2]), rows([3, -1]), torch.tensor([0]))


def test_min_snr_weights_hand_computed():
    t = torch.tensor([0, 1])
    # gamma 0.5: min(SNR, 0.5) = 0.5 at both t.  eps: 0.5 / SNR;  v: 0.5 / (SNR + 1)
    torch.testing.assert_close(snr_weights(scheduler(), t, 0.5, "epsilon"), torch.tensor([0.5 * 9 / 16, 0.5 * 16 / 9]))
    torch.testing.assert_close(snr_weights(scheduler(), t, 0.5, "v_prediction"), torch.tensor([0.5 * 9 / 25, 0.5 * 16 / 25]))
    # gamma above both SNRs: eps weights are 1, v weights SNR / (SNR + 1)
    torch.testing.assert_close(snr_weights(scheduler(), t, 5.0, "epsilon"), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(snr_weights(scheduler(), t, 5.0, "v_prediction"), torch.tensor([16 / 25, 9 / 25]))


# pred rows [1,2] and [3,1] against targets [0,0] and [1,1]: MSEs (1+4)/2 = 2.5 and (4+0)/2 = 2.0
PRED, TARGET = rows([1, 2], [3, 1]), rows([0, 0], [1, 1])


def floats(logs: dict) -> dict:
    """The logged parts are detached 0-d tensors (no host sync inside the loss); read them here."""
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in logs.values())
    return {k: v.item() for k, v in logs.items()}


def test_loss_without_prior_is_the_plain_mse():
    loss, logs = dreambooth_loss(PRED, TARGET, torch.tensor([0, 1]), noise_scheduler=scheduler(),
                                 with_prior=False, prior_loss_weight=1.0)
    assert loss.item() == pytest.approx(2.25)
    assert floats(logs) == {"instance_loss": pytest.approx(2.25), "prior_loss": 0.0}


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_loss_with_prior_is_instance_plus_lambda_prior(weight):
    loss, logs = dreambooth_loss(PRED.clone().requires_grad_(), TARGET, torch.tensor([0, 1]),
                                 noise_scheduler=scheduler(), with_prior=True, prior_loss_weight=weight)
    logs = floats(logs)  # detached even though pred requires grad
    assert logs["instance_loss"] == pytest.approx(2.5)
    assert logs["prior_loss"] == pytest.approx(2.0)
    assert loss.item() == pytest.approx(2.5 + weight * 2.0)


def test_prior_halves_are_first_and_second_half_of_the_batch():
    # [inst a, inst b, class a, class b]; against zeros: inst (1 + 0)/2 = 0.5, prior (4 + 2)/2 = 3.0.
    # Splitting rows 0,2 / 1,3 instead would give 2.5 and 1.0.
    pred = rows([1, 1], [0, 0], [2, 2], [0, 2])
    loss, logs = dreambooth_loss(pred, torch.zeros_like(pred), torch.tensor([0, 1, 0, 1]),
                                 noise_scheduler=scheduler(), with_prior=True, prior_loss_weight=1.0)
    logs = floats(logs)
    assert (logs["instance_loss"], logs["prior_loss"]) == (pytest.approx(0.5), pytest.approx(3.0))
    assert loss.item() == pytest.approx(3.5)


@pytest.mark.parametrize("prediction_type, w0, w1", [("epsilon", 9 / 32, 8 / 9), ("v_prediction", 9 / 50, 8 / 25)])
def test_min_snr_weights_each_half_with_its_own_timesteps(prediction_type, w0, w1):
    # instance row at t=0, class row at t=1; gamma 0.5 -> weights w0 (t=0) and w1 (t=1).
    loss, logs = dreambooth_loss(PRED, TARGET, torch.tensor([0, 1]), noise_scheduler=scheduler(prediction_type),
                                 with_prior=True, prior_loss_weight=0.5, snr_gamma=0.5)
    logs = floats(logs)
    assert logs["instance_loss"] == pytest.approx(2.5 * w0)
    assert logs["prior_loss"] == pytest.approx(2.0 * w1)
    assert loss.item() == pytest.approx(2.5 * w0 + 0.5 * 2.0 * w1)
    # diffusers' scripts weight the instance half with all 2B timesteps: mean(w0, w1) here.
    assert logs["instance_loss"] != pytest.approx(2.5 * (w0 + w1) / 2)


def test_min_snr_without_prior_weights_each_example():
    loss, _ = dreambooth_loss(PRED, TARGET, torch.tensor([1, 0]), noise_scheduler=scheduler(),
                              with_prior=False, prior_loss_weight=1.0, snr_gamma=0.5)
    assert loss.item() == pytest.approx((2.5 * 8 / 9 + 2.0 * 9 / 32) / 2)


def test_loss_is_fp32_and_differentiable_from_half_precision():
    pred = PRED.half().requires_grad_()
    loss, _ = dreambooth_loss(pred, TARGET.half(), torch.tensor([0, 1]), noise_scheduler=scheduler(),
                              with_prior=True, prior_loss_weight=1.0)
    assert loss.dtype == torch.float32
    loss.backward()
    # d/dpred of mean((pred - target)^2) over 2 numbers per half = (pred - target)
    torch.testing.assert_close(pred.grad.float(), rows([1, 2], [2, 0]))


def test_odd_batch_with_prior_raises():
    with pytest.raises(ValueError, match="even"):
        dreambooth_loss(rows([1, 2], [3, 1], [0, 0]), rows([0, 0], [0, 0], [0, 0]), torch.tensor([0, 1, 0]),
                        noise_scheduler=scheduler(), with_prior=True, prior_loss_weight=1.0)


def test_sample_noise_without_offset_is_standard_normal_and_seeded():
    latents = torch.zeros(2, 4, 8, 8)
    noise = sample_noise(latents, 0.0, torch.Generator().manual_seed(3))
    assert noise.shape == latents.shape and noise.dtype == latents.dtype
    assert torch.equal(noise, torch.randn(latents.shape, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(noise, sample_noise(latents, 0.0, torch.Generator().manual_seed(4)))


def test_offset_noise_shifts_whole_channels():
    latents = torch.zeros(256, 4, 8, 8)
    plain = sample_noise(latents, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(latents, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(offset, sample_noise(latents, 1.0, torch.Generator().manual_seed(0)))
    shift = offset - plain
    # one constant per (image, channel) ...
    assert (shift - shift[:, :, :1, :1]).abs().max() < 1e-5
    # ... drawn from N(0, strength^2): channel means vary with variance 1/64 + 1 instead of 1/64.
    assert shift[:, :, 0, 0].std().item() == pytest.approx(1.0, abs=0.1)
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 64, rel=0.25)
    assert offset.mean(dim=(2, 3)).var().item() == pytest.approx(1 + 1 / 64, rel=0.15)
