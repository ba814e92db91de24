"""What the UNet families (SD 1.x/2.x, SDXL) answer alike: a UNet2DConditionModel trained on DDPM noise
(paper Eq. 2: x_t = alpha_t x + sigma_t eps, t ~ U{0..T-1}, target eps or v), VAE latents that are
only scaled, DPM-Solver++ (or the model's own sampler) with classifier-free guidance 7.5 for class
images and validation grids, fp16 as the half precision."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel

from .. import loss, memory
from ..errors import InputError
from .base import dtype_kw, encode_latents, load_vae, model_index, vae_config, vae_scale_factor  # noqa: F401  (encode_latents: answered alike)

DENOISER = "unet"  # the pipeline component (and folder) that denoises
DENOISER_CLASS = UNet2DConditionModel
HALF_DTYPE = "fp16"  # half precision of sampling on CUDA (class images, load_pipeline)
DEFAULT_GUIDANCE = 7.5  # classifier-free guidance of class images and validation grids
GUIDANCE_KNOB = ("g", "classifier-free guidance scale")  # what guidance_scale is: grid label prefix, description
CLASS_SAMPLERS = ("dpmsolver++", "model")  # DPM-Solver++ on the model's schedule (25 steps ~ 50 PNDM), or its own
# LoRA target presets of TrainConfig.lora_modules: the UNet's attention projections, as diffusers' scripts.
LORA_PRESETS = {"default": ["to_q", "to_k", "to_v", "to_out.0"], "attention": ["to_q", "to_k", "to_v", "to_out.0"]}
LORA_KEY_FORMAT = "diffusers"  # LoRA file keys as diffusers' SD scripts write them (lora.down / lora.up)
LORA_OWN_LAYERS = ()  # their files' unet.* keys already name the family
LORA_EXCLUDED = None  # no layer a preset names by mistake


def check_objective(cfg, warn) -> None:
    """Flow-matching settings mean nothing to DDPM: refuse a sigma density, warn about a guidance value."""
    if cfg.weighting_scheme != "none":
        raise InputError(f"weighting_scheme = {cfg.weighting_scheme!r} draws flow-matching sigmas (FLUX); SD and SDXL "
                         "draw DDPM timesteps uniformly: leave it 'none' (snr_gamma weights their loss)")
    if cfg.quantize_base != "no":
        raise InputError(f"quantize_base = {cfg.quantize_base!r}: QLoRA is offered for the FLUX transformers (12 B); an "
                         "SD / SDXL LoRA fits a 16 GB GPU without it: set quantize_base = 'no'")
    if cfg.training_guidance is not None:
        warn(f"training_guidance = {cfg.training_guidance}: this model has no guidance embedding (only FLUX.1 [dev] "
             "has one); it is ignored")


def load_denoiser_parts(model: str, revision: str | None, vae_model: str | None = None, dtypes: dict | None = None,
                        ) -> tuple[AutoencoderKL, UNet2DConditionModel, DDPMScheduler]:
    """VAE (the model's, or vae_model's), UNet and the training scheduler: the same folders in every UNet family.
    dtypes: {"denoiser": dtype, ...} for parts read straight in that dtype (no fp32 copy first); others fp32."""
    kw = dict(revision=revision)
    vae = load_vae(vae_model) if vae_model else AutoencoderKL.from_pretrained(model, subfolder="vae", **kw)
    # diffusers' default attention processor is torch SDPA (memory-efficient attention, no xformers).
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **kw, **dtype_kw(dtypes, "denoiser"))
    # Training noise comes from DDPM with the model's own schedule and prediction_type (eps or v).
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kw)
    return vae, unet, noise_scheduler


def native_resolution(model: str, revision: str | None = None) -> int:
    """The side the model was trained at: UNet sample_size x VAE scale factor (512 for SD 1.5, 1024 for SDXL)."""
    unet = UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision)
    return unet["sample_size"] * vae_scale_factor(vae_config(model, revision))


def draw_timesteps(noise_scheduler, latents: torch.Tensor, cfg, generator: torch.Generator) -> torch.Tensor:
    """t ~ U{0..T-1}, one per row."""
    return torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                         device=latents.device)


def noisy_and_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """(x_t = alpha_t x + sigma_t eps, what the UNet must predict: eps or v)."""
    return noise_scheduler.add_noise(latents, noise, t), loss.diffusion_target(noise_scheduler, latents, noise, t)


def loss_weighting(noise_scheduler, t: torch.Tensor, cfg) -> None:
    """No per-row weights besides Min-SNR (loss.dreambooth_loss applies cfg.snr_gamma itself)."""
    return None


def predict(denoiser, noisy: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The UNet's output for (x_t, t) and the conditioning of denoiser_conditioning (tensor or keyword dict)."""
    return (denoiser(noisy, t, **cond) if isinstance(cond, dict) else denoiser(noisy, t, cond)).sample


def activation_bytes(denoiser_config: dict, images: int, resolution: int, dtype_bytes: int, checkpointing: bool,
                     vae_factor: int, text_tokens: int = 0) -> float:
    """What the UNet's forward keeps for backward (memory.activation_bytes, calibrated on SD1.5)."""
    return memory.activation_bytes(denoiser_config, images, resolution, dtype_bytes, checkpointing, vae_factor)


def lora_fit_problem(shapes: dict[str, list[int]], model: str, revision: str | None) -> str | None:
    """Why a LoRA file (its {key: shape}) cannot be this UNet's: the width of its cross-attention inputs
    (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048); None when it fits."""
    width = UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision).get("cross_attention_dim")
    widths = {shape[1] for k, shape in shapes.items()
              if k.startswith("unet.") and "attn2.to_k" in k and ("lora_A" in k or "lora.down" in k)}
    if isinstance(width, int) and widths and widths != {width}:
        return (f"its UNet cross-attention takes {sorted(widths)}-wide text features, this model's {width} "
                "(SD 1.x: 768, SD 2.x: 1024, SDXL: 2048)")
    return None


def class_sampler_config(model: str, revision: str | None, sampler: str) -> dict:
    """Config of the class-image sampler: the base model's scheduler ("model"), or DPM-Solver++ on the
    model's noise schedule and prediction type ("dpmsolver++": 25 steps ~ 50 of SD1.5's PNDM)."""
    config = dict(DDPMScheduler.load_config(model, subfolder="scheduler", revision=revision))
    config["_class_name"] = model_index(model, revision)["scheduler"][1]  # what the pipeline loads
    if sampler == "dpmsolver++":
        config = dict(DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++").config)
        config["_class_name"] = DPMSolverMultistepScheduler.__name__
    return config


def sampling_kwargs(pipe) -> dict:
    """Pipeline-call arguments every sampler call passes: none for the UNet families."""
    return {}


def validation_scheduler(noise_scheduler):
    """The sampler of in-training validation grids: DPM-Solver++ on the training schedule (a new object:
    sampling sets timesteps on it)."""
    return DPMSolverMultistepScheduler.from_config(noise_scheduler.config)
