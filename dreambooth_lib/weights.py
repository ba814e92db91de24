"""Trained weights on disk: the family's LoRA file (what `pipe.load_lora_weights` reads) or diffusers
model folders, written by checkpoints and the final save, and read back when a run resumes."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from . import families
from .config import TrainConfig
from .errors import InputError
from .families import as_tuple

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file training writes and load_lora_weights reads


def lora_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, save_embedding_layers=False))


def save_weights(folder: Path, unet, text_encoder, cfg: TrainConfig) -> None:
    """Inference-ready weights: the family's LoRA file for pipe.load_lora_weights (keys unet.*,
    text_encoder.*, text_encoder_2.*), or unet/ (+ text_encoder/ ...) folders. text_encoder: one, or a
    tuple in the family's TEXT_ENCODERS order."""
    family, encoders = families.of(cfg), as_tuple(text_encoder)
    if cfg.use_lora:
        # Each adapter's LoraConfig goes in the file's metadata: without it load_lora_weights assumes
        # lora_alpha = rank, and a run trained with another alpha would be sampled at the wrong scale.
        # Dropout is left out (0): diffusers builds the loaded adapter's Dropout in training mode, which
        # would make sampling random for a run trained with lora_dropout > 0.
        named = [("unet", unet)] + (list(zip(family.TEXT_ENCODERS, encoders)) if cfg.train_text_encoder else [])
        family.LORA_LOADER.save_lora_weights(
            folder, **{f"{name}_lora_layers": lora_layers(module) for name, module in named},
            **{f"{name}_lora_adapter_metadata": {**module.peft_config["default"].to_dict(), "lora_dropout": 0.0}
               for name, module in named})
    else:
        unet.save_pretrained(folder / "unet")
        if cfg.train_text_encoder:
            for name, encoder in zip(family.TEXT_ENCODERS, encoders):
                encoder.save_pretrained(folder / name)


def load_weights(folder: Path, unet, text_encoder, cfg: TrainConfig) -> None:
    """Inverse of save_weights, into the live (unwrapped) models; LoRA keys must all match."""
    family, encoders = families.of(cfg), as_tuple(text_encoder)
    named_encoders = list(zip(family.TEXT_ENCODERS, encoders)) if cfg.train_text_encoder else []
    if not cfg.use_lora:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet").state_dict())
        for name, encoder in named_encoders:
            encoder.load_state_dict(type(encoder).from_pretrained(folder / name).state_dict())
        return
    state = family.LORA_LOADER.lora_state_dict(folder, weight_name=LORA_WEIGHTS)[0]
    parts = [("unet.", unet, convert_unet_state_dict_to_peft)]
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
