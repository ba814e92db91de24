"""FLUX.2 [klein] (Black Forest Labs; 4 B and 9 B): a flow-matching transformer with one Qwen3 text encoder.

The Flux2Transformer2DModel denoises tokens of 2x2-patchified 32-channel latents ([B, H/2 * W/2, 128]), each
with a position id (0, row, col, 0); the text is Qwen3's hidden states 9, 18 and 27 of the prompt in its chat
template, concatenated per token (3 x 2560 wide for the 4 B model), with ids (0, 0, 0, token). No pooled vector
and no guidance embedding: [klein] base samples with classifier-free guidance, the step-distilled [klein]
(is_distilled) without. The VAE's latents are patchified, then normalised by its batch-norm running statistics
(Flux2KleinPipeline._encode_vae_image): this family's latents live in that patchified space, where the
flow-matching objective (shared with FLUX.1: x_s = (1 - s) x + s eps, target eps - x) is drawn.
"""

from __future__ import annotations

import sys

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.loaders import Flux2LoraLoaderMixin
from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

from ..errors import InputError
from .base import Models, dtype_kw, input_device, refuse_ddpm_settings_and_fp16, text_length, transformer_layers_problem, vae_scale_factor
from .flux import (activation_bytes, class_sampler_config, draw_timesteps, loss_weighting,  # noqa: F401  (FLUX.1's flow-matching
                   noisy_and_target, validation_scheduler)  # objective, sampler and activation estimate: not calibrated on a GPU)

NAME = "flux2"
LABEL = "FLUX.2 [klein]"
PIPELINE_CLASS_NAMES = ("Flux2KleinPipeline",)
PIPELINE = Flux2KleinPipeline
PIPELINE_EXTRAS = {}  # is_distilled is read from model_index.json
LORA_LOADER = Flux2LoraLoaderMixin  # transformer only: it loads no text-encoder LoRA
LORA_KEY_FORMAT = "peft"
# Transformer layers (regular expressions on the module name) FLUX.1 lacks: a LoRA file naming one is FLUX.2's.
# A LoRA of the double blocks' attention only (to_q ... to_add_out) has the same names in both.
LORA_OWN_LAYERS = (r"\.ff(_context)?\.linear_(in|out)$", r"\.attn\.to_qkv_mlp_proj$",
                   r"^single_transformer_blocks\.\d+\.attn\.to_out$")
DENOISER = "transformer"
DENOISER_CLASS = Flux2Transformer2DModel
TEXT_ENCODERS = ("text_encoder",)  # Qwen3 (4 B / 8 B)
TOKENIZERS = ("tokenizer",)
# A full fine-tune may train Qwen3 too (train_text_encoder; the saved pipeline folder holds it). diffusers' klein
# script keeps it frozen, and Flux2KleinPipeline.load_lora_weights loads transformer LoRA only: no text LoRA.
TRAINED_TEXT_ENCODERS = ("text_encoder",)
TEXT_LORA_TARGETS = []
VAE_FORCE_UPCAST = False
FIXED_VAE_HINT = None
HALF_DTYPE = "bf16"  # released and trained (diffusers' script) in bf16
DEFAULT_GUIDANCE = 4.0  # Flux2KleinPipeline's; the distilled [klein] ignores it
GUIDANCE_KNOB = ("g", "classifier-free guidance (FLUX.2 [klein] base; the step-distilled [klein] ignores it)")
CLASS_SAMPLERS = ("model",)  # its flow-matching Euler sampler, mu from the image size and step count
TEXT_LAYERS = (9, 18, 27)  # Qwen3 hidden states the pipeline stacks (Flux2KleinPipeline's text_encoder_out_layers)
# Double-stream blocks' attention, both streams (the single blocks fuse q, k, v and the MLP input in one layer).
_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
# "default": the double blocks' attention and feed-forwards and the single blocks' fused input projection;
# "attention": the double blocks' attention projections only.
LORA_PRESETS = {"default": _ATTENTION + ["ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                                         "ff_context.linear_out", "attn.to_qkv_mlp_proj"],
                "attention": _ATTENTION}
LORA_EXCLUDED = None  # the presets name only layers inside the blocks


def transformer_config(model: str, revision: str | None = None) -> dict:
    return Flux2Transformer2DModel.load_config(model, subfolder="transformer", revision=revision)


def check_config(cfg, vae_config: dict, warn) -> None:
    """No fp16, no DDPM-only setting, no text-encoder LoRA (a full fine-tune may train Qwen3); the Qwen3 length
    within the pipeline's."""
    refuse_ddpm_settings_and_fp16(cfg, "FLUX.2", "FLUX.2 [klein] is released and trained in bf16; fp16 is not supported here")
    if cfg.train_text_encoder and cfg.use_lora:
        raise InputError("train_text_encoder = True with use_lora: Flux2KleinPipeline.load_lora_weights loads transformer "
                         "LoRA only, so a Qwen3 LoRA could not be loaded. Set train_text_encoder False (diffusers' klein "
                         "script keeps Qwen3 frozen), or train it in a full fine-tune (use_lora False)")
    if cfg.max_sequence_length > 512:
        raise InputError(f"max_sequence_length = {cfg.max_sequence_length}: Flux2KleinPipeline encodes at most 512 tokens")
    if cfg.training_guidance is not None:
        warn(f"training_guidance = {cfg.training_guidance}: FLUX.2 [klein] has no guidance embedding; it is ignored")


def resolution_multiple(vae_config: dict) -> tuple[int, str]:
    factor = vae_scale_factor(vae_config)
    return 2 * factor, f"VAE factor {factor} x 2x2 latent patches"


def native_resolution(model: str, revision: str | None = None) -> int:
    """Flux2KleinPipeline's default size: 128 latent cells a side (1024 px with its 8x VAE)."""
    config = AutoencoderKLFlux2.load_config(model, subfolder="vae", revision=revision)
    return 128 * vae_scale_factor(config)


def load_models(model: str, revision: str | None = None, vae_model: str | None = None, dtypes: dict | None = None,
                quantization: dict | None = None) -> Models:
    """quantization: from_pretrained arguments that quantize the transformer while it loads (QLoRA)."""
    if vae_model:
        raise InputError(f"vae_model = {vae_model!r}: FLUX.2 [klein] uses its own AutoencoderKLFlux2; leave vae_model unset")
    kw = dict(revision=revision)
    # Qwen3 is never trained: read it in the half precision whenever training uses one.
    text_encoder = Qwen3ForCausalLM.from_pretrained(model, subfolder="text_encoder", **kw,
                                                    **(dtype_kw(dtypes, "text_encoders") or dtype_kw(dtypes, "denoiser")))
    tokenizer = Qwen2Tokenizer.from_pretrained(model, subfolder="tokenizer", **kw)
    vae = AutoencoderKLFlux2.from_pretrained(model, subfolder="vae", **kw)
    transformer = Flux2Transformer2DModel.from_pretrained(model, subfolder="transformer", **kw,
                                                          **(quantization or dtype_kw(dtypes, "denoiser")))
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler", **kw)
    return Models(sys.modules[__name__], transformer, vae, noise_scheduler, (text_encoder,), (tokenizer,))


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The posterior's mode (as the pipeline encodes images: sample_mode="argmax"), patchified 2x2 into
    4C channels, normalised by the VAE's batch-norm statistics: [B, 4C, H/16, W/16] for an 8x VAE.
    generator: unused (no draw)."""
    z = Flux2KleinPipeline._patchify_latents(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return ((z - mean) / std).float()


def encode_prompts(tokenizers, text_encoders, prompts: list[str], cfg) -> dict[str, torch.Tensor]:
    """{"encoder_hidden_states": [B, max_sequence_length, 3 D]}: each prompt in the chat template (thinking
    off), padded to max_sequence_length, Qwen3's hidden states TEXT_LAYERS stacked per token; as
    Flux2KleinPipeline._get_qwen3_prompt_embeds."""
    (tokenizer,), (qwen,) = tokenizers, text_encoders
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False) for p in prompts]
    inputs = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                       max_length=text_length(tokenizer, cfg.max_sequence_length))
    device = input_device(qwen)
    hidden = qwen(input_ids=inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device),
                  output_hidden_states=True, use_cache=False).hidden_states
    stacked = torch.stack([hidden[k] for k in TEXT_LAYERS], dim=2)  # [B, L, layers, D]
    return {"encoder_hidden_states": stacked.flatten(2)}


def sampling_kwargs(pipe) -> dict:
    """Flux2KleinPipeline pads the templated prompt to max_sequence_length (512 unless told): the model's length."""
    return dict(max_sequence_length=text_length(pipe.tokenizer, 512))


def denoiser_conditioning(text: dict[str, torch.Tensor], sizes, cfg, denoiser_config) -> dict:
    """The text sequence only: [klein] has no guidance embedding (check_config warns on training_guidance)."""
    return dict(text)


def predict(denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """Pack x_s [B, C, h, w] into tokens [B, h w, C] with (0, row, col, 0) ids, the text with (0, 0, 0, i)
    ids, run the transformer (timestep = sigma, the pipeline's t / 1000), unpack its velocity."""
    b, c, h, w = noisy.shape
    text = cond["encoder_hidden_states"]
    out = denoiser(hidden_states=Flux2KleinPipeline._pack_latents(noisy), timestep=t.to(noisy.dtype), guidance=None,
                   encoder_hidden_states=text, txt_ids=Flux2KleinPipeline._prepare_text_ids(text).to(noisy.device),
                   img_ids=Flux2KleinPipeline._prepare_latent_ids(noisy).to(noisy.device), return_dict=False)[0]
    return out.permute(0, 2, 1).reshape(b, c, h, w)


def lora_fit_problem(shapes: dict[str, list[int]], model: str, revision: str | None) -> str | None:
    """Every transformer layer of the file must be one of this model's Linear layers, with its widths (a
    FLUX.1 LoRA names ff.net.* / single-block to_q layers [klein] lacks, or other widths)."""
    return transformer_layers_problem(shapes, Flux2Transformer2DModel, transformer_config(model, revision), LABEL)

