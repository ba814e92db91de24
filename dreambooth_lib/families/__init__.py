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
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

from ..data import InputError

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
    """The UNet family whose text stack has n encoders (SD: 1, SDXL: 2): how train.encode_prompts, which
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


from . import sd, sdxl  # noqa: E402  (the family modules use Models above)

FAMILIES = {sd.NAME: sd, sdxl.NAME: sdxl}
