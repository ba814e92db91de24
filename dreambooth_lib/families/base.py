"""What every family module builds on: the components a run trains (Models) and how a diffusers
pipeline folder's parts are found and loaded, without loading a family module."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

from ..errors import InputError

CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP self-attention Linear layers


@dataclass
class Models:
    """The components training touches, in fp32 as loaded; only what is trained keeps requires_grad."""
    text_encoder: torch.nn.Module  # CLIP text encoder (SDXL: the first, CLIP ViT-L)
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler  # the training (forward-process) scheduler, paper's alpha_t / sigma_t
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second encoder (OpenCLIP bigG, with projection)
    tokenizer_2: object | None = None  # the tokenizer of text_encoder_2
    family: str = "sd"  # the families.FAMILIES key these components belong to

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        return tuple(m for m in (self.text_encoder, self.text_encoder_2) if m is not None)


def as_tuple(text_encoder) -> tuple:
    """One text encoder (SD) or a tuple of them (SDXL: text_encoder, text_encoder_2) -> a tuple."""
    return tuple(text_encoder) if isinstance(text_encoder, (tuple, list)) else (text_encoder,)


def load_denoiser_parts(model: str, revision: str | None, vae_model: str | None = None, dtypes: dict | None = None,
                        ) -> tuple[AutoencoderKL, UNet2DConditionModel, DDPMScheduler]:
    """VAE (the model's, or vae_model's), UNet and the training scheduler: the same folders in every UNet family.
    dtypes: {"unet": dtype, ...} for parts read straight in that dtype (no fp32 copy first); others fp32."""
    kw = dict(revision=revision)
    vae = load_vae(vae_model) if vae_model else AutoencoderKL.from_pretrained(model, subfolder="vae", **kw)
    # diffusers' default attention processor is torch SDPA (memory-efficient attention, no xformers).
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **kw, **dtype_kw(dtypes, "unet"))
    # Training noise comes from DDPM with the model's own schedule and prediction_type (eps or v).
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kw)
    return vae, unet, noise_scheduler


def dtype_kw(dtypes: dict | None, part: str) -> dict:
    """from_pretrained's dtype argument for `part` when dtypes names one (diffusers and transformers: dtype=)."""
    return {"dtype": dtypes[part]} if dtypes and dtypes.get(part) is not None else {}


def load_vae(vae_model: str) -> AutoencoderKL:
    """A separate VAE: a VAE folder / hub id (e.g. madebyollin/sdxl-vae-fp16-fix) or a pipeline's vae/."""
    nested = Path(vae_model) / "vae"
    return AutoencoderKL.from_pretrained(vae_model, subfolder="vae" if nested.is_dir() else None)


def vae_config(model: str, revision: str | None = None, vae_model: str | None = None) -> dict:
    """config.json of the VAE training uses (vae_model's, else the model's), without loading weights."""
    if vae_model:
        nested = Path(vae_model) / "vae"
        return AutoencoderKL.load_config(vae_model, subfolder="vae" if nested.is_dir() else None)
    return AutoencoderKL.load_config(model, subfolder="vae", revision=revision)


def vae_scale_factor(config: dict) -> int:
    """Pixels per latent cell: the VAE halves the picture between consecutive blocks."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def native_resolution(model: str, revision: str | None = None) -> int:
    """The side the model was trained at: UNet sample_size x VAE scale factor (512 for SD 1.5, 1024 for SDXL)."""
    unet = UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision)
    return unet["sample_size"] * vae_scale_factor(vae_config(model, revision))


def model_index(model: str, revision: str | None = None) -> dict:
    """model_index.json of a pipeline folder or hub id (hub: from the local cache when offline)."""
    folder = Path(model)
    if folder.is_dir():
        index = folder / "model_index.json"
        if not index.is_file():
            raise InputError(f"pretrained_model {model} has no model_index.json: point it to a diffusers pipeline "
                             "folder (what save_pretrained writes) or a hub id")
        return json.loads(index.read_text())
    try:
        return DiffusionPipeline.load_config(model, revision=revision)
    except OSError as err:
        raise InputError(f"pretrained_model {model!r} is neither a local folder nor a reachable hub id ({err}); "
                         "check the path, or download the model first") from err
