"""Config validation: every check that needs no model, so bad input fails in seconds, not after
loading Stable Diffusion. Each message names the setting (or file) and says what to do."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from accelerate.utils import parse_flag_from_env

from . import distributed, families
from .class_images import MANIFEST_NAME, manifest_differences, mismatch_message, vae_fingerprint, weights_fingerprint
from .data import _has_word, build_prompts, fill_prompt, load_instance_images
from .errors import InputError
from .subjects import subjects_of

MIXED_PRECISIONS = ("no", "fp16", "bf16", "auto")  # "auto": families.with_family_defaults
PRECISIONS = ("fp32", "fp16", "bf16")  # of the VAE, the class images and the saved pipeline; plus "auto" for the first two
OPTIMIZERS = ("auto", "adamw", "adamw8bit", "adamw8bit-torchao")
COMPILE_TARGETS = ("off", "step", "unet", "blocks")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CLASS_SAMPLERS = ("auto", "dpmsolver++", "model")  # which a family offers: families.check
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")  # diffusers.training_utils' names
BASE_QUANTIZATIONS = ("no", "nf4", "int8")  # TrainConfig.quantize_base


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def validate_config(cfg) -> None:
    """Every check that needs no model, so bad input fails in seconds, not after loading SD."""
    from diffusers.optimization import SchedulerType  # names only: no model code runs

    _check_ranges(cfg, positive=["max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                                 "adam_epsilon", "max_grad_norm", "validation_inference_steps",
                                 "num_validation_images", "max_sequence_length"],
                  non_negative=["prior_loss_weight", "lr_warmup_steps", "adam_weight_decay", "offset_noise",
                                "checkpointing_steps", "validation_steps", "seed"])
    for name in ("learning_rate", "text_encoder_lr"):  # "auto": config.resolve_auto sets them by method and model
        value = getattr(cfg, name)
        _check(value == "auto" or (name == "text_encoder_lr" and value is None)
               or (isinstance(value, (int, float)) and value > 0), f"{name} = {value!r} must be > 0 (or 'auto')")
    for name in ("snr_gamma", "lora_alpha"):
        value = getattr(cfg, name)
        _check(value is None or value > 0, f"{name} = {value} must be > 0 (or None)")
    for name in ("validation_guidance_scale", "training_guidance"):
        value = getattr(cfg, name)
        _check(value is None or value >= 0, f"{name} = {value} must be >= 0 (or None for the family's default)")
    _check(cfg.weighting_scheme in WEIGHTING_SCHEMES,
           f"weighting_scheme = {cfg.weighting_scheme!r}: use one of {WEIGHTING_SCHEMES}")
    _check_resolution(cfg)
    for name in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(cfg, name) < 1, f"{name} = {getattr(cfg, name)} must be in [0, 1)")
    if cfg.use_lora:
        _check(cfg.lora_rank == "auto" or (isinstance(cfg.lora_rank, int) and cfg.lora_rank > 0),
               f"lora_rank = {cfg.lora_rank!r} must be > 0 (4-64 is usual) or 'auto'")
        _check(0 <= cfg.lora_dropout < 1, f"lora_dropout = {cfg.lora_dropout} must be in [0, 1)")
        _check(len(cfg.lora_modules) > 0, "lora_modules is empty: name a preset ('default', 'attention') or the "
                                          "denoiser's layers to adapt, e.g. to_q to_k to_v to_out.0")
    _check_sharding(cfg)
    _check(cfg.quantize_base in BASE_QUANTIZATIONS, f"quantize_base = {cfg.quantize_base!r}: use one of {BASE_QUANTIZATIONS}")
    _check(cfg.quantize_base == "no" or cfg.use_lora,
           f"quantize_base = {cfg.quantize_base!r} trains LoRA over a frozen quantized base (QLoRA): set use_lora = True, "
           "or quantize_base = 'no' for a full fine-tune")
    families.check_quantization(cfg)  # bitsandbytes and a device diffusers' quantizer accepts
    limit = cfg.checkpoints_total_limit
    _check(limit is None or limit >= 1, f"checkpoints_total_limit = {limit} must be >= 1 (or None for all)")

    _check(cfg.mixed_precision in MIXED_PRECISIONS, f"mixed_precision = {cfg.mixed_precision!r}: use one of {MIXED_PRECISIONS}")
    _check(cfg.vae_precision == "auto" or cfg.vae_precision in PRECISIONS,
           f"vae_precision = {cfg.vae_precision!r}: use 'auto' or one of {PRECISIONS}")
    _check(cfg.model_family == "auto" or cfg.model_family in families.FAMILIES,
           f"model_family = {cfg.model_family!r}: use 'auto' (read from the model) or one of {tuple(families.FAMILIES)}")
    _check(cfg.optimizer in OPTIMIZERS, f"optimizer = {cfg.optimizer!r}: use one of {OPTIMIZERS}")
    if cfg.optimizer == "adamw8bit-torchao":
        _check(importlib.util.find_spec("torchao") is not None,
               "optimizer = 'adamw8bit-torchao' needs torchao (not a dependency): pip install torchao, or use 'auto'")
    for name in ("gradient_checkpointing", "channels_last"):
        value = getattr(cfg, name)
        _check(isinstance(value, bool) or value == "auto", f"{name} = {value!r}: use True, False or 'auto'")
    _check(cfg.save_precision in PRECISIONS, f"save_precision = {cfg.save_precision!r}: use one of {PRECISIONS}")
    _check(cfg.compile in COMPILE_TARGETS, f"compile = {cfg.compile!r}: use one of {COMPILE_TARGETS}")
    _check(cfg.compile_mode in COMPILE_MODES, f"compile_mode = {cfg.compile_mode!r}: use one of {COMPILE_MODES}")
    schedulers = tuple(s.value for s in SchedulerType)
    _check(cfg.lr_scheduler in schedulers, f"lr_scheduler = {cfg.lr_scheduler!r}: use one of {schedulers}")
    if cfg.resume not in (None, "latest"):
        _check(Path(cfg.resume).is_dir(), f"resume = {cfg.resume!r}: use 'latest' or an existing checkpoint folder")

    subjects = subjects_of(cfg)  # one: cfg itself; several: each subject's own config, checked alike
    for subject in subjects:
        try:
            _validate_subject(subject.cfg)
        except InputError as err:
            raise (InputError(f"subject {subject.name!r}: {err}") if cfg.subjects is not None else err) from None


def _validate_subject(cfg) -> None:
    """One subject's checks: class noun, identifier, instance prompt, photos and captions, class images."""
    if cfg.with_prior_preservation:
        _check(bool(cfg.class_noun.strip()),
               "with_prior_preservation needs class_noun (e.g. 'dog'): set it, or turn prior preservation off")

    # Identifier: it must reach the text encoder, or the subject binds to nothing.
    placeholder = "{identifier}"
    if cfg.identifier is not None:
        identifier = cfg.identifier.strip()
        _check(len(identifier.split()) == 1, f"identifier = {cfg.identifier!r} must be one word, e.g. 'sks'")
    else:
        identifier = placeholder
    instance_prompt, _ = build_prompts(cfg, identifier)
    if not cfg.use_captions:
        _check(_has_word(instance_prompt, identifier),
               f"instance_prompt_template {cfg.instance_prompt_template!r} does not contain the identifier: "
               f"add {placeholder}")

    images = load_instance_images(cfg.instance_dir, cfg.resolution or 0, cfg.use_captions)
    if cfg.use_captions:
        for image in images:
            _check(_has_word(image.caption, identifier) or placeholder in image.caption,
                   f"caption of {image.path} does not contain the identifier {identifier!r}: add it or {placeholder}")
    if cfg.with_prior_preservation:
        validate_class_image_config(cfg)


def validate_class_image_config(cfg) -> str:
    """The checks that generating class images needs, and no more (`class-images` runs without subject
    photos): count, sampler settings, class prompt, and a user's class_dir made by another model or
    prompt. Returns the class prompt."""
    _check_ranges(cfg, positive=["num_class_images", "class_inference_steps"],
                  non_negative=["seed"])
    _check(cfg.class_guidance_scale is None or cfg.class_guidance_scale >= 0,
           f"class_guidance_scale = {cfg.class_guidance_scale} must be >= 0 (or None for the family's default)")
    _check(cfg.class_batch_size == "auto" or (isinstance(cfg.class_batch_size, int) and cfg.class_batch_size > 0),
           f"class_batch_size = {cfg.class_batch_size!r}: use 'auto' or an integer > 0")
    _check(cfg.class_sampler in CLASS_SAMPLERS, f"class_sampler = {cfg.class_sampler!r}: use one of {CLASS_SAMPLERS}")
    _check_resolution(cfg)
    _check(bool(cfg.class_noun.strip()), "class images need class_noun (e.g. 'dog'): it fills {class_noun} of the class prompt")
    _check(cfg.prior_generation_precision == "auto" or cfg.prior_generation_precision in PRECISIONS,
           f"prior_generation_precision = {cfg.prior_generation_precision!r}: use 'auto' or one of {PRECISIONS}")
    class_prompt = fill_prompt(cfg.class_prompt_template, class_noun=cfg.class_noun, setting="class_prompt_template")
    manifest_path = Path(cfg.class_dir or ".") / MANIFEST_NAME
    if cfg.class_dir and manifest_path.is_file():
        made = json.loads(manifest_path.read_text())
        wanted = {"model_weights": weights_fingerprint(cfg.pretrained_model, cfg.revision),
                  "vae_weights": vae_fingerprint(cfg.vae_model), "class_prompt": class_prompt}
        if "family" in made:  # manifests written before model families were all SD's
            wanted["family"] = families.of(cfg).NAME
        differ = manifest_differences(made, wanted)
        _check(not differ, mismatch_message(manifest_path, differ))
    return class_prompt


def _check_sharding(cfg) -> None:
    """What a sharded launch can train (the launcher's environment says; no model needed): under FSDP a full
    fine-tune of the denoiser alone with torch AdamW; DeepSpeed not at all."""
    kind = distributed.sharding_requested()
    _check(kind != "deepspeed",
           "the launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED), which this library does not support: its "
           "checkpoints store the optimizer's own state, which ZeRO partitions inside its engine. Shard a full "
           f"fine-tune with FSDP instead: {distributed.FSDP_LAUNCH} (docs/scaling_out.md)")
    if kind != "fsdp":
        return
    fsdp = "under FSDP (the launch config's distributed_type: FSDP)"
    _check(cfg.quantize_base == "no",
           f"quantize_base = {cfg.quantize_base!r} {fsdp}: FSDP shards a full fine-tune; QLoRA trains megabytes over a "
           "frozen base, so launch it without the FSDP config (docs/scaling_out.md)")
    _check(not cfg.use_lora,
           f"use_lora = True {fsdp}: FSDP shards a full fine-tune; a LoRA run's trained weights are megabytes, so "
           "launch it without the FSDP config (plain data parallel, docs/scaling_out.md), or set use_lora False")
    _check(not cfg.train_text_encoder,
           f"train_text_encoder = True {fsdp}: accelerate's FSDP2 shards one model per optimizer, the denoiser; set "
           "train_text_encoder False, or train the text encoder without FSDP")
    _check(cfg.optimizer in ("auto", "adamw"),
           f"optimizer = {cfg.optimizer!r} {fsdp}: bitsandbytes' 8-bit AdamW cannot step FSDP's sharded (DTensor) "
           "parameters and torchao's is untested with them; use 'adamw' or 'auto' (which picks it under FSDP: the "
           "shards already divide its states by the number of processes)")
    _check(cfg.compile == "off", f"compile = {cfg.compile!r} {fsdp}: untested with sharded modules; set compile 'off'")
    _check(not parse_flag_from_env("FSDP_ACTIVATION_CHECKPOINTING"),
           "fsdp_activation_checkpointing: true in the launch config: set it false and use gradient_checkpointing "
           "(the denoiser's own, which the memory plan counts) instead of checkpointing twice")


def _check_resolution(cfg) -> None:
    """None (the model's native size, filled in by families.with_native_resolution) or a multiple of 8."""
    value = cfg.resolution
    _check(value is None or value > 0, f"resolution = {value} must be > 0 (or None for the model's native size)")
    _check(value is None or value % 8 == 0, f"resolution = {value} must be a multiple of 8 (the VAE downsamples by 8)")


def _check_ranges(cfg, positive: list[str], non_negative: list[str]) -> None:
    for name in positive:
        value = getattr(cfg, name)
        _check(value > 0, f"{name} = {value} must be > 0")
    for name in non_negative:
        value = getattr(cfg, name)
        _check(value >= 0, f"{name} = {value} must be >= 0")
