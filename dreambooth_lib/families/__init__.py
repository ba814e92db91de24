"""Model families: what differs between Stable Diffusion 1.x/2.x, SDXL, FLUX.1 and FLUX.2 [klein], one module each.

A family module answers the same questions; train.py, step.py and sample.py ask only these, so the
loss, caching, checkpoints, resume and `train_step` stay one code path for every family. The family is
resolved once per run (`of(cfg)`) and travels with the components (`Models.family`).

    NAME, LABEL, PIPELINE_CLASS_NAMES   its name, how messages name it, the model_index.json classes it reads
    PIPELINE, PIPELINE_EXTRAS           the diffusers pipeline class (sampling, class images, full fine-tune
                                        folder) and the constructor arguments it needs beyond the components
    LORA_LOADER, LORA_KEY_FORMAT        the loader mixin that saves / loads pytorch_lora_weights.safetensors,
                                        and its keys' format ("diffusers": lora.down / up; "peft": lora_A / B)
    LORA_OWN_LAYERS                     patterns of transformer layer names only its LoRA files have (lora_family)
    LORA_PRESETS                        {"default": [...], "attention": [...]} (FLUX.1 also "wide"): lora_modules presets
    LORA_EXCLUDED                       a regex of layers never given adapters (peft's exclude_modules), or None
    DENOISER, DENOISER_CLASS            the denoiser's component name ("unet", "transformer") and class
    TEXT_ENCODERS, TOKENIZERS           component names of the text encoders and their tokenizers, in order
    TRAINED_TEXT_ENCODERS               the encoders train_text_encoder trains (FLUX: CLIP, never T5)
    TEXT_LORA_TARGETS                   the text encoders' Linear layers given LoRA adapters
    VAE_FORCE_UPCAST, FIXED_VAE_HINT    whether its VAE must run in fp32 under fp16, and a VAE fixed for fp16
    HALF_DTYPE                          the half precision it samples in on CUDA ("fp16", FLUX "bf16")
    DEFAULT_GUIDANCE, CLASS_SAMPLERS    guidance of class images / validation grids; the samplers it offers
    GUIDANCE_KNOB                       (grid label prefix, what guidance_scale is): classifier-free or FLUX's distilled
    check_config(cfg, vae_config, warn)         its checks of a TrainConfig before any weights load
    resolution_multiple(vae_config)             (the side's multiple, why), checked by check() before model work
    native_resolution(model, revision)          the side it was trained at (resolution=None)
    load_models(model, revision, vae_model, dtypes) -> Models   (dtypes: {"denoiser" | "text_encoders": dtype})
                                                (FLUX also quantization=: from_pretrained arguments quantizing the
                                                denoiser, QLoRA; a family without it refuses quantize_base in check_config)
  pictures <-> latents, text, the denoiser:
    encode_latents(vae, pixels, generator)      z from pictures (scaling and shift factors); pipelines decode
    encode_prompts(tokenizers, text_encoders, prompts, cfg) -> per-prompt text conditioning (batch first)
    denoiser_conditioning(text, sizes, cfg, denoiser_config) -> what the denoiser takes besides (x_t, t)
    predict(denoiser, x_t, t, cond)             the denoiser's output in the latents' layout (packing inside)
  the objective:
    draw_timesteps(scheduler, latents, cfg, generator)  t per row (DDPM: integers; flow matching: sigmas)
    noisy_and_target(scheduler, latents, noise, t)      (x_t, the regression target)
    loss_weighting(scheduler, t, cfg)                   per-row loss weights, or None
  memory and sampling:
    activation_bytes(denoiser_config, images, resolution, dtype_bytes, checkpointing, vae_factor, text_tokens)
    class_sampler_config(model, revision, sampler)      the class-image sampler's config (manifest, pipeline)
    validation_scheduler(noise_scheduler)               the sampler of in-training validation grids
    sampling_kwargs(pipe)                               what every pipeline call passes besides prompts, seeds and
                                                        guidance (FLUX: the text length the model trained at)
    lora_fit_problem(shapes, model, revision)           why a LoRA file ({key: shape}) cannot be this model's

The family of a model is read from its model_index.json (`_class_name`), or named by the user
(TrainConfig.model_family). See docs/families.md, "Adding a family".
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch

from . import flux, flux2, sd, sdxl
from .base import (CLIP_ATTENTION, Models, as_tuple, base_quantization, check_quantization, dtype_kw,  # noqa: F401  (the seam's API)
                   encode_latents, load_vae, model_index, quantized_load, vae_config, vae_scale_factor)
from ..errors import InputError

FAMILIES = {sd.NAME: sd, sdxl.NAME: sdxl, flux.NAME: flux, flux2.NAME: flux2}


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


def of(cfg):
    """The family module of a TrainConfig's base model."""
    return resolve(cfg.model_family, cfg.pretrained_model, cfg.revision)


def of_pipeline(pipe):
    """The family module of a loaded diffusers pipeline (by its class)."""
    return next(f for f in FAMILIES.values() if isinstance(pipe, f.PIPELINE))


def lora_family(keys, named: str | None = None):
    """The family a LoRA file (its keys) was trained for: the one named (a run's family), else the family whose
    own layer names (LORA_OWN_LAYERS) it has; None when neither says (e.g. SD files, or attention-only FLUX)."""
    if named in FAMILIES:
        return FAMILIES[named]
    modules = {k.split(".", 1)[1].split(".lora")[0] for k in keys if k.startswith("transformer.")}
    return next((f for f in FAMILIES.values()
                 if any(re.search(p, m) for p in f.LORA_OWN_LAYERS for m in modules)), None)


def lora_targets(family, names: list[str]) -> list[str]:
    """TrainConfig.lora_modules resolved: one preset name of the family, or layer names as given."""
    if len(names) == 1 and names[0] in family.LORA_PRESETS:
        return list(family.LORA_PRESETS[names[0]])
    return list(names)


def with_family_defaults(cfg, cuda: bool | None = None):
    """cfg with what "the family's" settings leave open filled in: resolution (with_native_resolution),
    class and validation guidance, class-image sampler, and "auto" mixed precision: the family's half
    precision when training on CUDA (cuda=None: torch.cuda.is_available()), "no" on a CPU."""
    cfg = with_native_resolution(cfg)
    family = of(cfg)
    if cfg.mixed_precision == "auto":
        cuda = torch.cuda.is_available() if cuda is None else cuda
        cfg = dataclasses.replace(cfg, mixed_precision=family.HALF_DTYPE if cuda else "no")
    return dataclasses.replace(
        cfg, class_sampler=family.CLASS_SAMPLERS[0] if cfg.class_sampler == "auto" else cfg.class_sampler,
        class_guidance_scale=family.DEFAULT_GUIDANCE if cfg.class_guidance_scale is None else cfg.class_guidance_scale,
        validation_guidance_scale=(family.DEFAULT_GUIDANCE if cfg.validation_guidance_scale is None
                                   else cfg.validation_guidance_scale))


def native_resolution(model: str, revision: str | None = None) -> int:
    """The side a model was trained at, asked of its family (configs only, no weights)."""
    return get(detect(model, revision)).native_resolution(model, revision)


def trains_text_encoder(model: str, revision: str | None = None, lora: bool = True) -> bool:
    """Whether train_text_encoder may be set for this model in a LoRA (lora) or a full fine-tune (FLUX.2 [klein]:
    Qwen3 in full fine-tunes only; its pipeline loads no text-encoder LoRA)."""
    family = get(detect(model, revision))
    return bool(family.TRAINED_TEXT_ENCODERS) and (bool(family.TEXT_LORA_TARGETS) or not lora)


def with_native_resolution(cfg):
    """cfg with its resolution set: the user's, or (None) the model's native size."""
    if cfg.resolution is not None:
        return cfg
    family = of(cfg)  # an unknown model is reported as such, not as a missing UNet config
    return dataclasses.replace(cfg, resolution=family.native_resolution(cfg.pretrained_model, cfg.revision))


def check(cfg, warn=warnings.warn):
    """of(cfg), after the resolution grid and the family's own checks of cfg; reads config files only, no weights."""
    family = of(cfg)
    vae = vae_config(cfg.pretrained_model, cfg.revision, cfg.vae_model)
    step, why = family.resolution_multiple(vae)
    if cfg.resolution % step:
        raise InputError(f"resolution = {cfg.resolution}: {family.LABEL} needs a multiple of {step} ({why}), "
                         f"e.g. {max(step, cfg.resolution // step * step)}")
    if cfg.class_sampler not in ("auto", *family.CLASS_SAMPLERS):
        raise InputError(f"class_sampler = {cfg.class_sampler!r}: {family.LABEL} samples with one of "
                         f"{family.CLASS_SAMPLERS} (or 'auto')")
    family.check_config(cfg, vae, warn)
    return family
