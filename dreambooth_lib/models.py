"""The models a run trains: loading (the family's components, frozen parts read in half precision),
what is trainable, LoRA adapters (peft), the optimizer (8-bit AdamW or fused AdamW) and the memory plan
that resolves "auto" gradient checkpointing / optimizer for the device."""

from __future__ import annotations

import itertools
import re

import torch
from diffusers import AutoencoderKL
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoTokenizer

from . import families, memory
from .config import TrainConfig, resolve_auto
from .families import Models, as_tuple
from .memory import torch_dtype, use_channels_last


def load_tokenizer(cfg: TrainConfig):
    """The model's first tokenizer, of the class its tokenizer_config.json names (CLIP; FLUX.2 [klein]: Qwen2)."""
    return AutoTokenizer.from_pretrained(cfg.pretrained_model, subfolder="tokenizer", revision=cfg.revision)


def load_models(cfg: TrainConfig, family=None, device=None) -> Models:
    """The base model's components (its family's: families.of unless given), frozen except what cfg trains.
    What training freezes in half precision (a LoRA run's denoiser, a frozen text encoder) is read straight
    in cfg.mixed_precision's dtype, without an fp32 copy first; the rest (trained weights, VAE) in fp32.
    quantize_base: the denoiser is quantized while it loads, onto `device` (default: the current CUDA one)."""
    family = family or families.of(cfg)
    kw = {}
    if cfg.quantize_base != "no":  # only families with a quantization argument accept it (families.check)
        device = device if device is not None else (torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        kw["quantization"] = families.quantized_load(cfg, device, torch_dtype(cfg.mixed_precision))
    models = family.load_models(cfg.pretrained_model, cfg.revision, cfg.vae_model, dtypes=frozen_load_dtypes(cfg, family),
                                **kw)
    set_trainable(models, cfg)
    return models


def is_quantized(module: torch.nn.Module) -> bool:
    """Loaded with a quantization_config: its weights stay where and as from_pretrained put them (.to refuses)."""
    return bool(getattr(module, "is_quantized", False))


def frozen_load_dtypes(cfg: TrainConfig, family) -> dict:
    """{part: dtype} of the big frozen parts that prepare_training keeps in the mixed-precision dtype.
    A family whose encoders are not all trained (FLUX: T5) still reads them in fp32 here when CLIP is
    fully trained; prepare_models casts the frozen one."""
    half = torch_dtype(cfg.mixed_precision)
    if half == torch.float32:
        return {}
    text = None if cfg.train_text_encoder and not cfg.use_lora else half
    return {"denoiser": half if cfg.use_lora else None, "text_encoders": text}


def trained_text_encoders(models: Models, cfg: TrainConfig) -> tuple[torch.nn.Module, ...]:
    """The text encoders cfg trains (fully or with LoRA): the family's TRAINED_TEXT_ENCODERS, or none."""
    return models.text_encoders[:len(models.family.TRAINED_TEXT_ENCODERS)] if cfg.train_text_encoder else ()


def set_trainable(models: Models, cfg: TrainConfig) -> None:
    """requires_grad only on what a full fine-tune trains (LoRA adds its own trainable layers later)."""
    models.vae.requires_grad_(False)
    models.denoiser.requires_grad_(not cfg.use_lora)
    trained = trained_text_encoders(models, cfg)
    for text_encoder in models.text_encoders:
        text_encoder.requires_grad_(text_encoder in trained and not cfg.use_lora)


def place(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    module.to(device)
    if dtype != torch.float32:  # loaded in fp32; only cast what mixed precision freezes in half precision
        module.to(dtype)


def add_lora(denoiser: torch.nn.Module, text_encoder, cfg: TrainConfig, family=None) -> None:
    """Attach trainable LoRA adapters ("default") to cfg.lora_modules of the denoiser (a family preset or
    layer names: families.lora_targets) and, when they are trained, to the attention of the text encoder,
    or of each in a tuple (the family's trained ones); base weights stay frozen."""
    family = family or families.of(cfg)
    cfg = resolve_auto(cfg)[0]  # lora_rank "auto"

    def lora_config(targets, exclude=None):
        return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, lora_dropout=cfg.lora_dropout,
                          init_lora_weights="gaussian", target_modules=targets, exclude_modules=exclude)
    targets = families.lora_targets(family, cfg.lora_modules)
    excluded = family.LORA_EXCLUDED
    if excluded and not any(re.fullmatch(excluded, t) for t in targets):
        excluded = None  # no target would name them (peft warns of an exclusion that excludes nothing)
    denoiser.add_adapter(lora_config(targets, excluded))
    if cfg.train_text_encoder:
        for encoder in as_tuple(text_encoder)[:len(family.TRAINED_TEXT_ENCODERS)]:
            encoder.add_adapter(lora_config(family.TEXT_LORA_TARGETS))


def trained_modules(models: Models, cfg: TrainConfig) -> list[torch.nn.Module]:
    """The denoiser, then the trained text encoders (the order of TrainingState.trained)."""
    return [models.denoiser, *trained_text_encoders(models, cfg)]


def parameter_groups(models: Models, cfg: TrainConfig) -> list[dict]:
    groups = [{"params": [p for p in models.denoiser.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:
        groups.append({"params": [p for m in trained_text_encoders(models, cfg) for p in m.parameters() if p.requires_grad],
                       "lr": cfg.text_encoder_lr or cfg.learning_rate})
    return groups


def make_optimizer(param_groups: list[dict], cfg: TrainConfig, log=print, name: str | None = None) -> torch.optim.Optimizer:
    """AdamW with 8-bit states (bitsandbytes or torchao: 4x less optimizer memory) or torch AdamW.

    name: the optimizer to build (default cfg.optimizer; "auto" unresolved by a memory plan = "adamw8bit",
    the CPU choice). torch AdamW runs fused (CUDA and CPU: one op per step for all tensors, a few
    multi-tensor kernels on CUDA) or foreach elsewhere, instead of ~10 ops per tensor; bitsandbytes
    still steps each tensor with its own Python call and kernel (~690 for SD1.5's UNet).
    """
    name = name or cfg.optimizer
    cfg = resolve_auto(cfg)[0]  # learning_rate "auto"
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
              eps=cfg.adam_epsilon)
    if name in ("adamw8bit", "auto"):
        try:
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(param_groups, **kw)
        except (ImportError, RuntimeError, OSError) as err:  # missing wheel or a failed CUDA setup
            log(f"note: bitsandbytes AdamW8bit unavailable ({err}); using torch.optim.AdamW (more optimizer memory)")
    if name == "adamw8bit-torchao":
        from torchao.optim import AdamW8bit  # validate_config checked that torchao is installed
        return AdamW8bit(param_groups, **kw)
    fused = all(p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, **kw, **(dict(fused=True) if fused else dict(foreach=True)))


def optimizer_name(optimizer) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    return f"{type(inner).__module__}.{type(inner).__name__}"


def memory_plan(cfg: TrainConfig, models: Models, device, shards: int = 0) -> memory.MemoryPlan:
    """cfg's gradient checkpointing and optimizer with "auto" resolved for these models (weights already
    placed in their training dtypes, LoRA attached) on `device` (see memory.plan_memory). shards: FSDP's
    number of processes (each holds 1/shards of the denoiser's weights, gradients and optimizer states);
    0 = no FSDP."""
    device = torch.device(device)
    share = {id(t): 1 / shards for t in models.denoiser.parameters()} if shards else {}
    modules = (models.denoiser, *models.text_encoders, models.vae)
    tensors = [t for m in modules for t in itertools.chain(m.parameters(), m.buffers())]
    # Frozen text encoders wait on the CPU once their prompts are cached (prepare_models): not counted.
    kept = (models.denoiser, *trained_text_encoders(models, cfg), models.vae) if cfg.train_text_encoder or \
        device.type != "cuda" else (models.denoiser, models.vae)
    weight_bytes = sum(t.numel() * t.element_size() * share.get(id(t), 1)
                       for m in kept for t in itertools.chain(m.parameters(), m.buffers()))
    free = None
    if device.type == "cuda":  # free now + what these models already hold there = free before they were placed
        free = torch.cuda.mem_get_info(device)[0] + sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)
    trainable = round(sum(p.numel() * share.get(id(p), 1) for m in trained_modules(models, cfg) for p in m.parameters()
                          if p.requires_grad))
    images = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
    half = 0 if cfg.mixed_precision == "no" else 2
    vae_factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    acts = {c: models.family.activation_bytes(models.denoiser.config, images, cfg.resolution, half or 4, c, vae_factor,
                                              cfg.max_sequence_length) for c in (False, True)}  # text tokens: FLUX's T5
    return memory.plan_memory(free, weight_bytes, trainable, acts, half, cfg.gradient_checkpointing, cfg.optimizer,
                              eight_bit=not shards)


def vae_precision(cfg: TrainConfig, family, vae: AutoencoderKL, weight_dtype: torch.dtype) -> tuple[torch.dtype, str]:
    """The VAE's dtype and why. SDXL's VAE overflows in fp16 (NaN latents, black images): its config says
    force_upcast, and it then runs in fp32 unless a fixed VAE (vae_model) is named."""
    if cfg.vae_precision != "auto":
        return torch_dtype(cfg.vae_precision), f"vae_precision={cfg.vae_precision!r}"
    if weight_dtype == torch.float16 and family.VAE_FORCE_UPCAST and vae.config.force_upcast:
        return torch.float32, (f"its config says force_upcast: {family.NAME}'s VAE overflows in fp16; "
                               f"vae_model={family.FIXED_VAE_HINT!r} runs in fp16 with less memory")
    return weight_dtype, f"mixed_precision={cfg.mixed_precision!r}"


def prepare_models(models: Models, cfg: TrainConfig, device, log=print, fsdp_shards: int = 0) -> memory.MemoryPlan:
    """In place, before the optimizer exists: frozen parts to the mixed-precision dtype on `device` (trained
    weights stay fp32), LoRA adapters, channels-last, then the memory plan and the gradient checkpointing it
    chose. Returns the plan. fsdp_shards: FSDP's number of processes (0: none); the denoiser then stays where
    it was loaded (CPU), and accelerate.prepare (fully_shard) moves each process's shard to its device."""
    weight_dtype = torch_dtype(cfg.mixed_precision)
    set_trainable(models, cfg)
    vae_dtype, why = vae_precision(cfg, models.family, models.vae, weight_dtype)
    log(f"VAE: {cfg.vae_model or 'the model' + chr(39) + 's own'} in {str(vae_dtype).removeprefix('torch.')} ({why})")
    place(models.vae, device, vae_dtype)
    trained = trained_text_encoders(models, cfg)
    for text_encoder in models.text_encoders:
        # With no text encoder trained, the prompts are cached (prepare_training) and the frozen encoders wait on
        # the CPU: they come to the GPU for the cache and the validation grids only (memory.text_encoders_on),
        # as diffusers' FLUX scripts free T5 after caching, or are streamed when they do not fit there.
        home = "cpu" if not cfg.train_text_encoder else device
        place(text_encoder, home, torch.float32 if text_encoder in trained and not cfg.use_lora else weight_dtype)
    if is_quantized(models.denoiser):  # QLoRA: on its device since loading; peft freezes it, upcasts norms to fp32
        prepare_model_for_kbit_training(models.denoiser, use_gradient_checkpointing=False)  # (the plan decides)
    elif not fsdp_shards:  # a whole FLUX.1 transformer in fp32 (48 GB) would not fit one GPU before sharding
        place(models.denoiser, device, torch.float32 if not cfg.use_lora else weight_dtype)
    if cfg.use_lora:
        add_lora(models.denoiser, models.text_encoders, cfg, models.family)
        cast_training_params(trained_modules(models, cfg), dtype=torch.float32)
    if use_channels_last(cfg.channels_last, device):  # NHWC: cuDNN convolutions without layout conversions
        if not fsdp_shards:  # fully_shard copies each shard into a contiguous (NCHW) buffer: a sharded UNet stays NCHW
            models.denoiser.to(memory_format=torch.channels_last)
        models.vae.to(memory_format=torch.channels_last)
    plan = memory_plan(cfg, models, device, fsdp_shards)
    log(f"memory plan: {plan.reason}")
    if plan.gradient_checkpointing:
        models.denoiser.enable_gradient_checkpointing()
        for text_encoder in trained:
            text_encoder.activation_checkpointing_enable()
    return plan
