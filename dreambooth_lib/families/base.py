"""What every family module builds on: the components a run trains (Models), how a diffusers pipeline
folder's parts are found and loaded, and VAE latents, without loading a family module."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, BitsAndBytesConfig, DiffusionPipeline
from diffusers.quantizers import DiffusersAutoQuantizer
from diffusers.utils.torch_utils import get_module_execution_device
from huggingface_hub.errors import GatedRepoError

from ..errors import InputError
from ..memory import torch_dtype

CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP self-attention Linear layers


@dataclass
class Models:
    """The components training touches, in fp32 as loaded; only what is trained keeps requires_grad."""
    family: ModuleType  # the family module these belong to (families/<name>.py): resolved once, asked everywhere
    denoiser: torch.nn.Module  # the family's DENOISER: UNet2DConditionModel (SD, SDXL) or a transformer (FLUX)
    vae: AutoencoderKL
    noise_scheduler: object  # the training (forward-process) scheduler: DDPM (alpha_t, sigma_t) or flow matching
    text_encoders: tuple[torch.nn.Module, ...]  # in family.TEXT_ENCODERS order
    tokenizers: tuple  # in family.TOKENIZERS order


def as_tuple(text_encoder) -> tuple:
    """One text encoder (SD) or a tuple of them (SDXL: text_encoder, text_encoder_2) -> a tuple."""
    return tuple(text_encoder) if isinstance(text_encoder, (tuple, list)) else (text_encoder,)


def text_length(tokenizer, requested: int) -> int:
    """Tokens a prompt is padded to: the requested max_sequence_length, at most what the model's tokenizer
    declares (model_max_length): a model trained on shorter text (the toy flow model: 32) is sampled and
    fine-tuned at its own length. T5's and Qwen3's tokenizers declare 512 or more: `requested` as before."""
    return min(requested, tokenizer.model_max_length)


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


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z = (E(x) - shift_factor) * scaling_factor, one draw from the VAE posterior (SD's VAE has no shift;
    FLUX's centres its 16 channels). Pipelines decode D(z / scaling_factor + shift_factor)."""
    sample = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
    shift = vae.config.get("shift_factor")
    if shift is not None:
        sample = sample - shift
    return (sample * vae.config.scaling_factor).float()


def input_device(module: torch.nn.Module) -> torch.device:
    """Where a module's inputs go: its weights' device, through a DDP wrapper too, or while accelerate streams it
    (its weights wait on meta: memory.text_encoders_on) its hooks' execution device (diffusers' helper)."""
    return get_module_execution_device(module)


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
        if isinstance(err.__context__, GatedRepoError):  # diffusers reports it as "not a valid model identifier"
            raise InputError(f"pretrained_model {model!r} is a gated hub repository (e.g. FLUX.1 [dev]): accept its "
                             f"licence at https://huggingface.co/{model} with your account, then log in here "
                             "(`hf auth login`; in Colab an HF_TOKEN secret) and run again") from err
        raise InputError(f"pretrained_model {model!r} is neither a local folder nor a reachable hub id ({err}); "
                         "check the path, or download the model first") from err


def base_quantization(cfg) -> BitsAndBytesConfig | None:
    """diffusers' bitsandbytes config of cfg.quantize_base (QLoRA, Dettmers et al. 2023): NF4 with the block
    scales quantized too ("double quantization", the paper's) computing in the mixed-precision dtype, or LLM.int8."""
    if cfg.quantize_base == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch_dtype(cfg.mixed_precision))
    if cfg.quantize_base == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def quantized_load(cfg, device, dtype: torch.dtype) -> dict:
    """from_pretrained arguments that quantize a denoiser while it loads onto `device` (cfg.quantize_base,
    computing in cfg.mixed_precision), its unquantized layers in dtype: training's, class images', sampling's."""
    return dict(quantization_config=base_quantization(cfg), device_map={"": device}, dtype=dtype)


def check_quantization(cfg) -> None:
    """Before any weights load: diffusers' own check that its bitsandbytes quantizer can run here (a GPU, a
    bitsandbytes and accelerate recent enough), its refusal turned into what to do."""
    if cfg.quantize_base == "no":
        return
    try:
        DiffusersAutoQuantizer.from_config(base_quantization(cfg)).validate_environment()
    except (ImportError, RuntimeError, ValueError) as err:
        raise InputError(f"quantize_base = {cfg.quantize_base!r}: diffusers' bitsandbytes quantizer cannot run here "
                         f"({err}). QLoRA needs a CUDA GPU and bitsandbytes >= 0.43.3 (pip install -U bitsandbytes); "
                         "or set quantize_base = 'no' (LoRA on the base in mixed_precision)") from err


def transformer_layers_problem(shapes: dict[str, list[int]], model_class, config: dict, label: str) -> str | None:
    """The first LoRA layer (transformer.<module>.lora_A / lora_B) that is not a Linear of `model_class` built
    from `config` (on the meta device: no weights), or whose lora_A input / lora_B output width differs."""
    with init_empty_weights():
        linears = {n: (m.in_features, m.out_features) for n, m in model_class.from_config(config).named_modules()
                   if isinstance(m, torch.nn.Linear)}
    for key, shape in sorted(shapes.items()):
        if not key.startswith("transformer.") or not (".lora_A." in key or ".lora_B." in key):
            continue
        module, part = key[len("transformer."):].split(".lora_")
        if module not in linears:
            return f"its layer transformer.{module} is not a layer of this {label} transformer"
        width = linears[module][0] if part.startswith("A") else linears[module][1]
        if shape[1 if part.startswith("A") else 0] != width:
            return f"its layer transformer.{module} is {shape} (lora_{part}), this {label} model's layer {linears[module]} wide"
    return None


def refuse_ddpm_settings_and_fp16(cfg, label: str, fp16_reason: str) -> None:
    """The flow-matching families' shared refusals: fp16 wherever they compute (fp16_reason says why) and
    Min-SNR-gamma, which weights DDPM timesteps while they train on flow-matching sigmas."""
    for name in ("mixed_precision", "prior_generation_precision", "vae_precision"):
        if getattr(cfg, name) == "fp16":
            raise InputError(f"{name} = 'fp16': {fp16_reason}. Use 'bf16' (or 'no' / 'auto')")
    if cfg.snr_gamma is not None:
        raise InputError(f"snr_gamma = {cfg.snr_gamma}: Min-SNR weights DDPM timesteps; {label} trains on flow-matching "
                         "sigmas. Leave it None and pick weighting_scheme instead")
