"""Stable Diffusion XL (Podell et al., 2023): two CLIP text encoders and size / crop micro-conditioning.

The UNet attends to both encoders' penultimate hidden states, concatenated on the feature axis
(768 + 1280 = 2048 for SDXL base). Through its added "text_time" embedding it also takes the second
encoder's pooled, projected embedding (text_embeds) and six numbers per image (time_ids): the original
height and width, the crop's top-left corner and the target height and width. SDXL was trained with
the real values; fine-tuning feeds each picture's own, recorded by the data pipeline (data.pixels_and_sizes).
"""

from __future__ import annotations

import sys

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .base import CLIP_ATTENTION, Models, dtype_kw, input_device, vae_scale_factor
from .unet import (CLASS_SAMPLERS, DEFAULT_GUIDANCE, DENOISER, DENOISER_CLASS, GUIDANCE_KNOB, HALF_DTYPE,  # noqa: F401  (the UNet families' answers)
                   LORA_EXCLUDED, LORA_KEY_FORMAT, LORA_OWN_LAYERS, LORA_PRESETS, activation_bytes, check_objective,
                   class_sampler_config, draw_timesteps, encode_latents, load_denoiser_parts, lora_fit_problem,
                   loss_weighting, native_resolution, noisy_and_target, predict, sampling_kwargs, validation_scheduler)

NAME = "sdxl"
LABEL = "SDXL"  # how messages name it
PIPELINE_CLASS_NAMES = ("StableDiffusionXLPipeline",)
PIPELINE = StableDiffusionXLPipeline
# No invisible watermark: it would alter the class images and the pictures the metrics score.
PIPELINE_EXTRAS = dict(add_watermarker=False)
LORA_LOADER = StableDiffusionXLLoraLoaderMixin
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
TRAINED_TEXT_ENCODERS = TEXT_ENCODERS  # what train_text_encoder trains: every encoder
TEXT_LORA_TARGETS = CLIP_ATTENTION
VAE_FORCE_UPCAST = True  # its VAE overflows in fp16: honour the VAE config's force_upcast
FIXED_VAE_HINT = "madebyollin/sdxl-vae-fp16-fix"  # the community's fp16-safe SDXL VAE


def check_config(cfg, vae_config: dict, warn) -> None:
    """An fp16 VAE only when it is one fixed for fp16; no flow-matching settings."""
    check_objective(cfg, warn)
    if cfg.vae_precision == "fp16" and vae_config.get("force_upcast", True):
        vae = f"vae_model {cfg.vae_model!r}" if cfg.vae_model else "the model's own VAE"
        warn(f"vae_precision='fp16' with {vae}, whose config says force_upcast: SDXL's VAE overflows in fp16 "
             f"(NaN loss, black images). Set vae_model={FIXED_VAE_HINT!r} (fixed for fp16), or leave "
             "vae_precision='auto' to run this VAE in fp32")


def resolution_multiple(vae_config: dict) -> tuple[int, str]:
    """SDXL's grid: 8 latent cells (its native size is 1024)."""
    return 8 * vae_scale_factor(vae_config), f"VAE factor {vae_scale_factor(vae_config)} x 8; its native size is 1024"


def load_models(model: str, revision: str | None = None, vae_model: str | None = None, dtypes: dict | None = None) -> Models:
    kw = dict(revision=revision)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kw, **dtype_kw(dtypes, "text_encoders"))
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", **kw,
                                                                 **dtype_kw(dtypes, "text_encoders"))
    tokenizers = tuple(CLIPTokenizer.from_pretrained(model, subfolder=name, **kw) for name in TOKENIZERS)
    vae, unet, noise_scheduler = load_denoiser_parts(model, revision, vae_model, dtypes)
    return Models(sys.modules[__name__], unet, vae, noise_scheduler, (text_encoder, text_encoder_2), tokenizers)


def encode_prompts(tokenizers, text_encoders, prompts: list[str], cfg=None) -> dict[str, torch.Tensor]:
    """{"encoder_hidden_states": [B, L, D1 + D2], "text_embeds": [B, P]}; row i is prompts[i].

    As StableDiffusionXLPipeline.encode_prompt (the same prompt for both encoders, no clip skip)."""
    hidden = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = text_encoder(ids.to(input_device(text_encoder)), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
    # out[0] of the last (projection) encoder: its pooled, projected embedding.
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": out[0]}


def denoiser_conditioning(text: dict[str, torch.Tensor], sizes: torch.Tensor | None, cfg=None, denoiser_config=None) -> dict:
    """UNet keyword arguments: the text hidden states, and the added (text_time) conditioning."""
    if sizes is None:
        raise ValueError("SDXL needs each image's original size / crop / target size (the batch's 'sizes'): "
                         "build the dataset with sizes (data.pixels_and_sizes)")
    embeds = text["text_embeds"]
    return {"encoder_hidden_states": text["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": embeds, "time_ids": sizes.to(embeds.device, embeds.dtype)}}
