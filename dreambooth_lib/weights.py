"""Trained weights on disk: the family's LoRA file (what `pipe.load_lora_weights` reads) or diffusers
model folders, written by checkpoints and the final save, and read back when a run resumes."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from . import families
from .config import TrainConfig
from .errors import InputError
from .families import as_tuple
from .fsio import sort_safetensors_metadata

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file training writes and load_lora_weights reads


def lora_layers(model: torch.nn.Module, key_format: str = "diffusers") -> dict[str, torch.Tensor]:
    """The adapter weights of `model`, keyed as the family's loader writes them (family.LORA_KEY_FORMAT)."""
    layers = get_peft_model_state_dict(model, save_embedding_layers=False)
    return convert_state_dict_to_diffusers(layers) if key_format == "diffusers" else layers


def adapter_metadata(module) -> dict:
    """The module's LoraConfig as saved beside its LoRA weights: sets as sorted lists, dropout 0 (see save_weights).
    With excluded layers (families' LORA_EXCLUDED), the targets are written as the adapted layers' whole names and
    the exclusion left out: a loader that takes its targets from the file's keys (diffusers) excludes nothing, and
    peft would warn so."""
    config = module.peft_config["default"].to_dict()
    if config.get("exclude_modules"):
        config["target_modules"] = {name for name, m in module.named_modules() if "default" in getattr(m, "lora_A", {})}
        config["exclude_modules"] = None
    return {**{k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}, "lora_dropout": 0.0}


def save_weights(folder: Path, denoiser, text_encoder, cfg: TrainConfig, family=None) -> None:
    """Inference-ready weights: the family's LoRA file for pipe.load_lora_weights (keys unet.* or
    transformer.*, text_encoder.*, text_encoder_2.*), or unet/ or transformer/ (+ text_encoder/ ...)
    folders. text_encoder: one, or a tuple in the family's TEXT_ENCODERS order (those it trains are saved)."""
    family = family or families.of(cfg)
    encoders = as_tuple(text_encoder)[:len(family.TRAINED_TEXT_ENCODERS)]
    if cfg.use_lora:
        # Each adapter's LoraConfig goes in the file's metadata: without it load_lora_weights assumes
        # lora_alpha = rank, and a run trained with another alpha would be sampled at the wrong scale.
        # Dropout is left out (0): diffusers builds the loaded adapter's Dropout in training mode, which
        # would make sampling random for a run trained with lora_dropout > 0.
        # Sets (target_modules) are written sorted and the header's keys in order: the same weights, the same file.
        named = [(family.DENOISER, denoiser)] + (list(zip(family.TEXT_ENCODERS, encoders)) if cfg.train_text_encoder else [])
        family.LORA_LOADER.save_lora_weights(
            folder, **{f"{name}_lora_layers": lora_layers(module, family.LORA_KEY_FORMAT) for name, module in named},
            **{f"{name}_lora_adapter_metadata": adapter_metadata(module) for name, module in named})
        sort_safetensors_metadata(folder / LORA_WEIGHTS)
    else:
        denoiser.save_pretrained(folder / family.DENOISER)
        if cfg.train_text_encoder:
            for name, encoder in zip(family.TEXT_ENCODERS, encoders):
                encoder.save_pretrained(folder / name)


def load_weights(folder: Path, denoiser, text_encoder, cfg: TrainConfig, family=None) -> None:
    """Inverse of save_weights, into the live (unwrapped) models; LoRA keys must all match."""
    family = family or families.of(cfg)
    encoders = as_tuple(text_encoder)[:len(family.TRAINED_TEXT_ENCODERS)]
    named_encoders = list(zip(family.TEXT_ENCODERS, encoders)) if cfg.train_text_encoder else []
    if not cfg.use_lora:
        denoiser.load_state_dict(family.DENOISER_CLASS.from_pretrained(folder / family.DENOISER).state_dict())
        for name, encoder in named_encoders:
            encoder.load_state_dict(type(encoder).from_pretrained(folder / name).state_dict())
        return
    state = family.LORA_LOADER.lora_state_dict(folder, weight_name=LORA_WEIGHTS)
    state = state[0] if isinstance(state, tuple) else state  # SD / SDXL: (state, network alphas); FLUX: state
    parts = [(f"{family.DENOISER}.", denoiser, convert_unet_state_dict_to_peft)]
    parts += [(f"{name}.", encoder, lambda sd: convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd)))
              for name, encoder in named_encoders]
    for prefix, model, to_peft in parts:
        sd = to_peft({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        try:
            result = set_peft_model_state_dict(model, sd, adapter_name="default")
            problem = [k for k in result.missing_keys if "lora_" in k] + result.unexpected_keys
        except RuntimeError as err:  # shape mismatch
            problem = [str(err).splitlines()[1].strip()]
        if problem or not sd:
            raise InputError(f"{folder / LORA_WEIGHTS} does not match the {prefix[:-1]} LoRA of this config "
                                  f"({problem[:3] or 'no weights'}); resume with the lora_rank / train_text_encoder "
                                  "it was trained with")
