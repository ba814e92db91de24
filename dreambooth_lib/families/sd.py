"""Stable Diffusion 1.x / 2.x: one CLIP text encoder; the UNet attends to its last hidden states."""

from __future__ import annotations

import sys

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from transformers import CLIPTextModel, CLIPTokenizer

from .base import CLIP_ATTENTION, Models, dtype_kw, input_device, vae_scale_factor
from .unet import (CLASS_SAMPLERS, DEFAULT_GUIDANCE, DENOISER, DENOISER_CLASS, GUIDANCE_KNOB, HALF_DTYPE,  # noqa: F401  (the UNet families' answers)
                   LORA_EXCLUDED, LORA_KEY_FORMAT, LORA_OWN_LAYERS, LORA_PRESETS, activation_bytes, check_objective,
                   class_sampler_config, draw_timesteps, encode_latents, load_denoiser_parts, lora_fit_problem,
                   loss_weighting, native_resolution, noisy_and_target, predict, sampling_kwargs, validation_scheduler)

NAME = "sd"
LABEL = "SD"  # how messages name it
PIPELINE_CLASS_NAMES = ("StableDiffusionPipeline",)
PIPELINE = StableDiffusionPipeline
# No NSFW checker (as diffusers' DreamBooth scripts): it blacks out false positives, corrupting metrics.
PIPELINE_EXTRAS = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
LORA_LOADER = StableDiffusionLoraLoaderMixin
TEXT_ENCODERS = ("text_encoder",)
TOKENIZERS = ("tokenizer",)
TRAINED_TEXT_ENCODERS = TEXT_ENCODERS  # what train_text_encoder trains: every encoder
TEXT_LORA_TARGETS = CLIP_ATTENTION
VAE_FORCE_UPCAST = False  # SD pipelines run the VAE in fp16 (its config's default force_upcast is unused)
FIXED_VAE_HINT = None


def check_config(cfg, vae_config: dict, warn) -> None:
    """Only the UNet families' check of flow-matching settings (validate.validate_config did the rest)."""
    check_objective(cfg, warn)


def resolution_multiple(vae_config: dict) -> tuple[int, str]:
    """Whole latent cells: a multiple of the VAE factor."""
    return vae_scale_factor(vae_config), f"VAE factor {vae_scale_factor(vae_config)}"


def load_models(model: str, revision: str | None = None, vae_model: str | None = None, dtypes: dict | None = None) -> Models:
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", revision=revision,
                                                 **dtype_kw(dtypes, "text_encoders"))
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", revision=revision)
    vae, unet, noise_scheduler = load_denoiser_parts(model, revision, vae_model, dtypes)
    return Models(sys.modules[__name__], unet, vae, noise_scheduler, (text_encoder,), (tokenizer,))


def encode_prompts(tokenizers, text_encoders, prompts: list[str], cfg=None) -> torch.Tensor:
    """CLIP's last hidden states [B, L, D] (the UNet's encoder_hidden_states); row i is prompts[i]."""
    (tokenizer,), (text_encoder,) = tokenizers, text_encoders
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(input_device(text_encoder)))[0]


def denoiser_conditioning(text: torch.Tensor, sizes: torch.Tensor | None, cfg=None, denoiser_config=None) -> torch.Tensor:
    """SD has no micro-conditioning: the text hidden states are all the UNet takes."""
    return text
