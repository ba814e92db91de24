"""FLUX.1 [dev] / [schnell] (Black Forest Labs, 2024): a flow-matching transformer with two text encoders.

The FluxTransformer2DModel denoises 2x2 patches of 16-channel latents ("packed": [B, H/2 * W/2, 64]),
each with a position id (0, row, col); CLIP-L gives one pooled vector, T5-XXL the token sequence
(ids all zero). Training follows diffusers' train_dreambooth(_lora)_flux.py: x_s = (1 - s) x + s eps,
target eps - x, s drawn through compute_density_for_timestep_sampling from the scheduler's sigmas
(unshifted: [dev]'s scheduler shifts only at sampling, per image size); the transformer takes s as its
timestep. [dev] was distilled with a guidance input, fed training_guidance (default 1.0, see config.py);
[schnell] has none. The VAE's latents are centred and scaled: (E(x) - 0.1159) * 0.3611.
"""

from __future__ import annotations

import sys

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from .. import loss
from ..errors import InputError
from .base import (CLIP_ATTENTION, Models, dtype_kw, encode_latents, input_device, load_vae, model_index, text_length,  # noqa: F401  (encode_latents: the shift factor is in the VAE config)
                   refuse_ddpm_settings_and_fp16, transformer_layers_problem, vae_config, vae_scale_factor)

NAME = "flux"
LABEL = "FLUX.1"
PIPELINE_CLASS_NAMES = ("FluxPipeline",)
PIPELINE = FluxPipeline
PIPELINE_EXTRAS = {}
LORA_LOADER = FluxLoraLoaderMixin
LORA_KEY_FORMAT = "peft"  # lora_A / lora_B keys, as diffusers' FLUX scripts write them
# Transformer layers (regular expressions on the module name) FLUX.2 lacks: a LoRA file naming one is FLUX.1's.
LORA_OWN_LAYERS = (r"\.ff(_context)?\.net\.", r"\.proj_mlp$", r"^single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_out)$",
                   r"\.norm1(_context)?\.linear$")
DENOISER = "transformer"
DENOISER_CLASS = FluxTransformer2DModel
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # CLIP-L (pooled), T5-XXL (sequence)
TOKENIZERS = ("tokenizer", "tokenizer_2")
TRAINED_TEXT_ENCODERS = ("text_encoder",)  # CLIP only: T5 (4.7 B parameters) stays frozen, as in diffusers' scripts
TEXT_LORA_TARGETS = CLIP_ATTENTION
VAE_FORCE_UPCAST = False  # runs in bf16, never fp16
FIXED_VAE_HINT = None
HALF_DTYPE = "bf16"  # FLUX.1 was trained in bf16; fp16 overflows its activations (diffusers #8599)
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's: [dev]'s distilled guidance; [schnell]'s pipeline ignores it
# guidance_scale is an input of [dev]'s transformer (distilled from classifier-free guidance), one pass per step
GUIDANCE_KNOB = ("dg", "distilled guidance embedding (FLUX.1 [dev]; not classifier-free guidance; [schnell] ignores it)")
CLASS_SAMPLERS = ("model",)  # its own flow-matching Euler sampler, with the size-dependent shift
_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",  # image stream (and single blocks' q/k/v)
              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]  # text stream
# "default": train_dreambooth_lora_flux.py's targets (both streams' attention and feed-forwards);
# "attention": the joint attention projections only (fewer parameters, the QLoRA recipe's kind);
# "wide": every Linear layer of the double and single blocks, the modulation layers included, as ai-toolkit's
# FLUX LoRA (its network wraps the Linear layers of FluxTransformerBlock and FluxSingleTransformerBlock).
_DEFAULT = _ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
LORA_PRESETS = {"default": _DEFAULT, "attention": _ATTENTION,
                "wide": _DEFAULT + ["norm1.linear", "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out"]}
# Never given adapters (a regular expression on the whole module name, peft's exclude_modules): the output
# projection after the blocks, which the single blocks' "proj_out" would otherwise also name.
LORA_EXCLUDED = "proj_out"


def transformer_config(model: str, revision: str | None = None) -> dict:
    return FluxTransformer2DModel.load_config(model, subfolder="transformer", revision=revision)


def check_config(cfg, vae_config: dict, warn) -> None:
    """No fp16 anywhere it computes; no DDPM-only setting; T5 length within the pipeline's; guidance only
    for a model with a guidance embedding."""
    refuse_ddpm_settings_and_fp16(cfg, "FLUX", "FLUX.1 was trained in bf16 and its activations overflow fp16's range "
                                              "(NaN loss, black images; diffusers #8599)")
    if cfg.max_sequence_length > 512:
        raise InputError(f"max_sequence_length = {cfg.max_sequence_length}: FluxPipeline encodes at most 512 T5 tokens")
    if cfg.training_guidance is not None and not transformer_config(cfg.pretrained_model, cfg.revision)["guidance_embeds"]:
        warn(f"training_guidance = {cfg.training_guidance}: {cfg.pretrained_model} has no guidance embedding "
             "(FLUX.1 [schnell] is step-distilled without one); it is ignored")


def resolution_multiple(vae_config: dict) -> tuple[int, str]:
    """Whole 2x2 patches of latent cells: 16 px for FLUX.1's 8x VAE."""
    factor = vae_scale_factor(vae_config)
    return 2 * factor, f"VAE factor {factor} x 2x2 latent patches"


def native_resolution(model: str, revision: str | None = None) -> int:
    """FluxPipeline's default size: 128 latent cells a side (1024 px with FLUX.1's VAE). The pipeline sets
    default_sample_size = 128 in __init__ only (not on the class), so it is written here."""
    return 128 * vae_scale_factor(vae_config(model, revision))


def load_models(model: str, revision: str | None = None, vae_model: str | None = None, dtypes: dict | None = None,
                quantization: dict | None = None) -> Models:
    """quantization: from_pretrained arguments that quantize the transformer while it loads (QLoRA)."""
    kw = dict(revision=revision)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kw, **dtype_kw(dtypes, "text_encoders"))
    # T5 is never trained: read it in the half precision whenever training uses one.
    t5_dtype = dtype_kw(dtypes, "text_encoders") or dtype_kw(dtypes, "denoiser")
    text_encoder_2 = T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2", **kw, **t5_dtype)
    tokenizers = (CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw),
                  T5Tokenizer.from_pretrained(model, subfolder="tokenizer_2", **kw))
    vae = load_vae(vae_model) if vae_model else AutoencoderKL.from_pretrained(model, subfolder="vae", **kw)
    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", **kw,
                                                         **(quantization or dtype_kw(dtypes, "denoiser")))
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler", **kw)
    return Models(sys.modules[__name__], transformer, vae, noise_scheduler, (text_encoder, text_encoder_2), tokenizers)


def encode_prompts(tokenizers, text_encoders, prompts: list[str], cfg) -> dict[str, torch.Tensor]:
    """{"encoder_hidden_states": T5's last hidden states [B, max_sequence_length, D], "pooled_projections":
    CLIP's pooled output [B, P]}; row i is prompts[i]. As FluxPipeline.encode_prompt (same prompt for both)."""
    (clip_tokenizer, t5_tokenizer), (clip, t5) = tokenizers, text_encoders
    ids = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    pooled = clip(ids.to(input_device(clip)), output_hidden_states=False).pooler_output
    ids = t5_tokenizer(prompts, padding="max_length", max_length=text_length(t5_tokenizer, cfg.max_sequence_length),
                       truncation=True,
                       return_tensors="pt").input_ids
    sequence = t5(ids.to(input_device(t5)), output_hidden_states=False)[0]
    return {"encoder_hidden_states": sequence, "pooled_projections": pooled}


def sampling_kwargs(pipe) -> dict:
    """FluxPipeline pads T5's text to max_sequence_length (512 unless told): the length the model trained at."""
    return dict(max_sequence_length=text_length(pipe.tokenizer_2, 512))


def denoiser_conditioning(text: dict[str, torch.Tensor], sizes, cfg, denoiser_config) -> dict:
    """The transformer's text inputs, plus [dev]'s guidance input (training_guidance, default 1.0) per row."""
    cond = dict(text)
    if denoiser_config.guidance_embeds:
        pooled = text["pooled_projections"]
        value = 1.0 if cfg.training_guidance is None else cfg.training_guidance
        cond["guidance"] = torch.full((pooled.shape[0],), value, device=pooled.device, dtype=torch.float32)
    return cond


def predict(denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """Pack x_s into 2x2 patches with their (0, row, col) ids, run the transformer (timestep = sigma, as
    FluxPipeline's t / 1000), unpack its velocity back to the latents' layout."""
    b, c, h, w = noisy.shape
    text = cond["encoder_hidden_states"]
    out = denoiser(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=t.to(noisy.dtype),
                   guidance=cond.get("guidance"), pooled_projections=cond["pooled_projections"],
                   encoder_hidden_states=text,
                   txt_ids=torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype),
                   img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
                   return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h, w, vae_scale_factor=1)  # h, w are latent cells already


def draw_timesteps(noise_scheduler, latents: torch.Tensor, cfg, generator: torch.Generator) -> torch.Tensor:
    """sigma per row: u from cfg.weighting_scheme's density, the scheduler's sigma at index u * T (as
    diffusers' script; clamped below T for u = 1, which the "mode" density can reach)."""
    u = compute_density_for_timestep_sampling(cfg.weighting_scheme, latents.shape[0], cfg.logit_mean, cfg.logit_std,
                                              cfg.mode_scale, device=latents.device, generator=generator)
    steps = noise_scheduler.config.num_train_timesteps
    index = (u * steps).long().clamp(max=steps - 1)
    return noise_scheduler.sigmas.to(latents.device)[index]


def noisy_and_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor):
    return loss.flow_matching_pair(latents, noise, sigmas)


def loss_weighting(noise_scheduler, sigmas: torch.Tensor, cfg) -> torch.Tensor:
    """compute_loss_weighting_for_sd3 per row: sigma^-2 ("sigma_sqrt"), cosmap, else ones."""
    return compute_loss_weighting_for_sd3(cfg.weighting_scheme, sigmas)


# Saved activations per token, per hidden unit, per block, in units of the activation dtype: a transformer
# layer with flash/SDPA attention keeps ~34 bytes per token per hidden unit in 16-bit (Korthikanti et al. 2022,
# "Reducing Activation Recomputation in Large Transformer Models"), i.e. 17 values; with checkpointing each
# block's input (1 value), plus the 17 of the one block recomputed during backward (as the UNet's estimate
# counts its block's temporaries). Not calibrated on FLUX (no GPU measurement yet): an estimate.
LAYER_VALUES = 17.0


def activation_bytes(denoiser_config: dict, images: int, resolution: int, dtype_bytes: int, checkpointing: bool,
                     vae_factor: int, text_tokens: int = 512) -> float:
    """What the transformer's forward keeps for backward: (image + text tokens) x width x blocks. A token
    passes one layer per block: a double-stream block's image and text streams hold their own tokens."""
    tokens = (resolution // vae_factor // 2) ** 2 + text_tokens
    width = denoiser_config["num_attention_heads"] * denoiser_config["attention_head_dim"]
    blocks = denoiser_config["num_layers"] + denoiser_config["num_single_layers"]
    values = blocks + LAYER_VALUES if checkpointing else blocks * LAYER_VALUES
    return values * tokens * width * images * dtype_bytes


def lora_fit_problem(shapes: dict[str, list[int]], model: str, revision: str | None) -> str | None:
    """Beyond its parts (check_lora_fits): every transformer layer one of this model's Linear layers (a FLUX.2
    [klein] LoRA names ff.linear_in / to_qkv_mlp_proj layers FLUX.1 lacks), and the width of its attention inputs."""
    config = transformer_config(model, revision)
    problem = transformer_layers_problem(shapes, FluxTransformer2DModel, config, LABEL)
    if problem:
        return problem
    width = config["num_attention_heads"] * config["attention_head_dim"]
    widths = {shape[1] for k, shape in shapes.items() if k.startswith("transformer.") and "attn.to_k.lora_A" in k}
    if widths and widths != {width}:
        return f"its transformer attention is {sorted(widths)} wide, this model's {width} (FLUX.1: 3072)"
    return None


def class_sampler_config(model: str, revision: str | None, sampler: str) -> dict:
    """The model's own flow-matching Euler scheduler (what FluxPipeline loads)."""
    config = dict(FlowMatchEulerDiscreteScheduler.load_config(model, subfolder="scheduler", revision=revision))
    config["_class_name"] = model_index(model, revision)["scheduler"][1]
    return config


def validation_scheduler(noise_scheduler):
    """Its own sampler, a new object (sampling sets timesteps on it)."""
    return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
