"""Stable Diffusion 1.x / 2.x: one CLIP text encoder; the UNet attends to its last hidden states."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from transformers import CLIPTextModel

from .base import CLIP_ATTENTION, Models, dtype_kw, load_denoiser_parts

NAME = "sd"
PIPELINE_CLASS_NAMES = ("StableDiffusionPipeline",)
PIPELINE = StableDiffusionPipeline
# No NSFW checker (as diffusers' DreamBooth scripts): it blacks out false positives, corrupting metrics.
PIPELINE_EXTRAS = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
LORA_LOADER = StableDiffusionLoraLoaderMixin
TEXT_ENCODERS = ("text_encoder",)
TOKENIZERS = ("tokenizer",)
TEXT_LORA_TARGETS = CLIP_ATTENTION
VAE_FORCE_UPCAST = False  # SD pipelines run the VAE in fp16 (its config's default force_upcast is unused)
FIXED_VAE_HINT = None


def check_config(cfg, vae_config: dict, warn) -> None:
    """Nothing beyond validate.validate_config's model-free checks."""


def load_models(model: str, revision: str | None = None, vae_model: str | None = None, dtypes: dict | None = None) -> Models:
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", revision=revision,
                                                 **dtype_kw(dtypes, "text_encoder"))
    vae, unet, noise_scheduler = load_denoiser_parts(model, revision, vae_model, dtypes)
    return Models(text_encoder, vae, unet, noise_scheduler, family=NAME)


def encode_prompts(tokenizers, text_encoders, prompts: list[str]) -> torch.Tensor:
    """CLIP's last hidden states [B, L, D] (the UNet's encoder_hidden_states); row i is prompts[i]."""
    (tokenizer,), (text_encoder,) = tokenizers, text_encoders
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(next(text_encoder.parameters()).device))[0]  # also through a DDP wrapper


def unet_conditioning(text: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
    """SD has no micro-conditioning: the text hidden states are all the UNet takes."""
    return text
