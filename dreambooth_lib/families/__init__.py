"""Model families: what differs between Stable Diffusion 1.x/2.x and its successors, one module each.

A family module answers the same few questions; train.py and sample.py ask only these, so the loss,
caching, checkpoints, resume and `train_step` stay one code path for every family:

    NAME, PIPELINE_CLASS_NAMES   its name, and the model_index.json `_class_name`s it reads
    PIPELINE                     the diffusers pipeline class: sampling, class images, full fine-tune folder
    PIPELINE_EXTRAS              constructor arguments that pipeline needs beyond the components
    LORA_LOADER                  the loader mixin that saves / loads pytorch_lora_weights.safetensors
    TEXT_ENCODERS, TOKENIZERS    component names of the text encoders and their tokenizers, in order
    TEXT_LORA_TARGETS            the text encoders' Linear layers given LoRA adapters
    VAE_FORCE_UPCAST             whether its VAE config's force_upcast holds (fp32 VAE under fp16)
    FIXED_VAE_HINT               a VAE that runs in fp16, to suggest (or None)
    check_config(cfg, vae_config, warn)   its checks of a TrainConfig before any weights load
    load_models(model, revision, vae_model, dtypes) -> Models   (dtypes: {part: dtype} read straight in it)
    encode_prompts(tokenizers, text_encoders, prompts) -> per-prompt text conditioning (batch first)
    unet_conditioning(text, sizes) -> what the UNet takes besides (x_t, t), from stacked text conditioning

The family of a model is read from its model_index.json (`_class_name`), or named by the user
(TrainConfig.model_family). See docs/families.md, "Adding a family", for what SD3 / FLUX would have to answer.
"""

from __future__ import annotations

import dataclasses
import warnings

from . import sd, sdxl
from .base import (CLIP_ATTENTION, Models, as_tuple, dtype_kw, load_denoiser_parts, load_vae,  # noqa: F401  (the seam's API)
                   model_index, native_resolution, vae_config, vae_scale_factor)
from ..errors import InputError

FAMILIES = {sd.NAME: sd, sdxl.NAME: sdxl}


def detect(model: str, revision: str | None = None) -> str:
    """The family name of a pipeline folder / hub id, from model_index.json's `_class_name`."""
    class_name = model_index(model, revision).get("_class_name")
    for name, family in FAMILIES.items():
        if class_name in family.PIPELINE_CLASS_NAMES:
            return name
    known = "; ".join(f"{name}: {', '.join(f.PIPELINE_CLASS_NAMES)}" for name, f in FAMILIES.items())
    raise InputError(f"pretrained_model {model}: its model_index.json names {class_name!r}, which no supported "
                     f"family reads ({known}). Use a model of one of them, or set model_family if it is one")


def get(name: str):
    """The family module called `name`."""
    if name not in FAMILIES:
        raise InputError(f"model_family = {name!r}: use 'auto' or one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def resolve(model_family: str, model: str, revision: str | None = None):
    """The family module of a model: the one named, or ("auto") the one its model_index.json names."""
    return get(detect(model, revision) if model_family == "auto" else model_family)


def by_text_encoder_count(n: int):
    """The UNet family whose text stack has n encoders (SD: 1, SDXL: 2): how step.encode_prompts, which
    receives only the tokenizers and encoders, picks the recipe."""
    return next(f for f in FAMILIES.values() if len(f.TEXT_ENCODERS) == n)


def of(cfg):
    """The family module of a TrainConfig's base model."""
    return resolve(cfg.model_family, cfg.pretrained_model, cfg.revision)


def with_native_resolution(cfg):
    """cfg with its resolution set: the user's, or (None) the model's native size."""
    if cfg.resolution is not None:
        return cfg
    of(cfg)  # an unknown model is reported as such, not as a missing UNet config
    return dataclasses.replace(cfg, resolution=native_resolution(cfg.pretrained_model, cfg.revision))


def check(cfg, warn=warnings.warn):
    """of(cfg), after the family's own checks of cfg; reads config files only, no weights."""
    family = of(cfg)
    family.check_config(cfg, vae_config(cfg.pretrained_model, cfg.revision, cfg.vae_model), warn)
    return family
