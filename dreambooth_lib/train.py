"""DreamBooth fine-tuning (Ruiz et al., CVPR 2023): full UNet or LoRA, one process or `accelerate launch`.

    python -m dreambooth_lib train --instance_dir photos/ --class_noun dog --output_dir runs/dog
    accelerate launch -m dreambooth_lib train --config run.json        # several GPUs

`train(cfg)` reads top to bottom: check the config -> prompts, class images, pixels ->
`prepare_training` (models +LoRA, optimizer, accelerate, cached latents / text embeddings) -> loop of
`train_step` (accumulate, NaN check, clip, step) + checkpoint / validation grid -> final weights +
summary.json. Every piece is a function that notebooks and benchmarks call on their own.

Exact resume: each random draw of a micro-step (data order, VAE sample, noise, timesteps) comes from a
generator seeded by (seed, micro-step, rank), so a run resumed from checkpoint-N makes the same draws as
an uninterrupted run; the checkpoint stores the rest (weights, optimizer, lr schedule, every process's
global RNG states used by LoRA dropout, loss history). Several processes: see distributed.py.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import itertools
import json
import math
import os
import re
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft, make_image_grid
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from . import data, distributed, families, loss, memory
from .config import TrainConfig, resolve_auto
from .families import Models  # noqa: F401  (train.Models: what load_models returns and prepare_training takes)
from .sample import LORA_WEIGHTS, generate

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STATE_JSON, STATE_TENSORS = "training_state.json", "training_state.safetensors"


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; nothing of the diverged step was saved."""


class SaveFailed(OSError):
    """Writing a checkpoint or the final weights failed (full disk, quota, I/O error). Its half-written
    temp folder is removed; the message names the checkpoint that is intact and how to resume."""


# --- models ---------------------------------------------------------------------------------------

def load_tokenizer(cfg: TrainConfig) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(cfg.pretrained_model, subfolder="tokenizer", revision=cfg.revision)


def load_models(cfg: TrainConfig) -> Models:
    """The base model's components (its family's: families.of), frozen except what cfg trains. What
    training freezes in half precision (a LoRA run's UNet, a frozen text encoder) is read straight in
    cfg.mixed_precision's dtype, without an fp32 copy first; the rest (trained weights, VAE) in fp32."""
    models = families.of(cfg).load_models(cfg.pretrained_model, cfg.revision, cfg.vae_model,
                                          dtypes=frozen_load_dtypes(cfg))
    set_trainable(models, cfg)
    return models


def frozen_load_dtypes(cfg: TrainConfig) -> dict:
    """{part: dtype} of the big frozen parts that prepare_training keeps in the mixed-precision dtype."""
    half = WEIGHT_DTYPES[cfg.mixed_precision]
    if half == torch.float32:
        return {}
    text = None if cfg.train_text_encoder and not cfg.use_lora else half
    return {"unet": half if cfg.use_lora else None, "text_encoder": text, "text_encoder_2": text}


def set_trainable(models: Models, cfg: TrainConfig) -> None:
    """requires_grad only on what a full fine-tune trains (LoRA adds its own trainable layers later)."""
    models.vae.requires_grad_(False)
    models.unet.requires_grad_(not cfg.use_lora)
    for text_encoder in models.text_encoders:
        text_encoder.requires_grad_(cfg.train_text_encoder and not cfg.use_lora)


def as_tuple(text_encoder) -> tuple:
    """One text encoder (SD) or a tuple of them (SDXL: text_encoder, text_encoder_2) -> a tuple."""
    return tuple(text_encoder) if isinstance(text_encoder, (tuple, list)) else (text_encoder,)


def place(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    module.to(device)
    if dtype != torch.float32:  # loaded in fp32; only cast what mixed precision freezes in half precision
        module.to(dtype)


def add_lora(unet: UNet2DConditionModel, text_encoder, cfg: TrainConfig) -> None:
    """Attach trainable LoRA adapters ("default") to cfg.lora_unet_modules (and, when they are trained,
    to the attention of the text encoder, or of each in a tuple); base weights stay frozen."""
    cfg = resolve_auto(cfg)[0]  # lora_rank "auto"

    def lora_config(targets):
        return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, lora_dropout=cfg.lora_dropout,
                          init_lora_weights="gaussian", target_modules=targets)
    unet.add_adapter(lora_config(list(cfg.lora_unet_modules)))
    if cfg.train_text_encoder:
        for encoder in as_tuple(text_encoder):
            encoder.add_adapter(lora_config(families.of(cfg).TEXT_LORA_TARGETS))


def trained_modules(models: Models, cfg: TrainConfig) -> list[torch.nn.Module]:
    """The UNet, then the text encoders when they are trained (the order of TrainingState.trained)."""
    return [models.unet, *models.text_encoders] if cfg.train_text_encoder else [models.unet]


def parameter_groups(models: Models, cfg: TrainConfig) -> list[dict]:
    groups = [{"params": [p for p in models.unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:
        groups.append({"params": [p for m in models.text_encoders for p in m.parameters() if p.requires_grad],
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


def encode_prompts(tokenizer, text_encoder, prompts: list[str]):
    """Prompts -> the family's text conditioning, batch first, row i for prompts[i]: SD's is CLIP's last
    hidden states [B, L, D]; a family with several encoders takes tuples of tokenizers and encoders
    (text_stack) and may return a dict of tensors (families/<family>.py, encode_prompts)."""
    tokenizers, encoders = as_tuple(tokenizer), as_tuple(text_encoder)
    return families.by_text_encoder_count(len(encoders)).encode_prompts(tokenizers, encoders, prompts)


def text_stack(models: Models, tokenizer) -> tuple:
    """(tokenizer, text_encoder) as encode_prompts takes them: one each, or tuples for several encoders."""
    if models.text_encoder_2 is None:
        return tokenizer, models.text_encoder
    return (tokenizer, models.tokenizer_2), models.text_encoders


def stack_rows(rows: list):
    """Stack per-item conditioning rows into a batch: tensors, or dicts of tensors key by key."""
    if isinstance(rows[0], dict):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return torch.stack(rows)


def split_rows(batch) -> list:
    """Inverse of stack_rows: row i of a tensor, or of every tensor of a dict."""
    if isinstance(batch, dict):
        n = len(next(iter(batch.values())))
        return [{k: v[i] for k, v in batch.items()} for i in range(n)]
    return list(batch)


# --- data -----------------------------------------------------------------------------------------

def class_image_paths(cfg: TrainConfig, class_prompt: str, log=print) -> list[Path]:
    """Generate (or reuse) the prior images x_pr = x_hat(z, c_pr) with the frozen base model (paper Sec. 3.3)."""
    cfg = families.with_native_resolution(cfg)
    class_dir = Path(cfg.class_dir) if cfg.class_dir else Path(cfg.output_dir) / "class_images"
    family = families.of(cfg)
    manifest = data.ClassImageManifest(
        model=cfg.pretrained_model, model_weights=data.weights_fingerprint(cfg.pretrained_model, cfg.revision),
        class_prompt=class_prompt, resolution=cfg.resolution,
        scheduler=data.sampler_name(class_sampler_config(cfg)), num_inference_steps=cfg.class_inference_steps,
        guidance_scale=cfg.class_guidance_scale, seed=cfg.seed, family=family.NAME, vae_model=cfg.vae_model,
        vae_weights=data.vae_fingerprint(cfg.vae_model))

    device = distributed.process_state().device
    dtype = data.class_image_dtype(cfg.prior_generation_precision, device)

    def make_pipeline():  # loaded in the sampling dtype: no cast afterwards
        vae = dict(vae=families.load_vae(cfg.vae_model).to(dtype=dtype)) if cfg.vae_model else {}
        pipe = family.PIPELINE.from_pretrained(cfg.pretrained_model, revision=cfg.revision, dtype=dtype,
                                               **family.PIPELINE_EXTRAS, **vae)
        if cfg.class_sampler == "dpmsolver++":
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(class_sampler_config(cfg))
        return pipe

    return data.ensure_class_images(class_dir, manifest, cfg.num_class_images, make_pipeline,
                                    batch_size=cfg.class_batch_size, device=device,
                                    user_supplied=cfg.class_dir is not None, log=log,
                                    precision=cfg.prior_generation_precision,
                                    channels_last=use_channels_last(cfg.channels_last, device))


def class_sampler_config(cfg: TrainConfig) -> dict:
    """Config of the class-image sampler: the base model's scheduler ("model"), or DPM-Solver++ on the
    model's noise schedule and prediction type ("dpmsolver++": 25 steps ~ 50 of SD1.5's PNDM)."""
    config = dict(DDPMScheduler.load_config(cfg.pretrained_model, subfolder="scheduler", revision=cfg.revision))
    config["_class_name"] = families.model_index(cfg.pretrained_model, cfg.revision)["scheduler"][1]  # what the pipeline loads
    if cfg.class_sampler == "dpmsolver++":
        config = dict(DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++").config)
        config["_class_name"] = DPMSolverMultistepScheduler.__name__
    return config


def pixels_and_sizes(images: list[Image.Image], cfg: TrainConfig, generator: torch.Generator,
                     ) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Training squares [3, R, R] in [-1, 1], and each one's data.Crop.sizes() (SDXL's micro-conditioning)."""
    squares = [data.preprocess_image_and_crop(im, cfg.resolution, center_crop=cfg.center_crop, generator=generator)
               for im in images]
    values, crops = [v for v, _ in squares], [c for _, c in squares]
    if cfg.random_flip:  # both orientations in the data set (not a per-step coin): works with cached latents
        values, crops = values + [v.flip(-1) for v in values], crops + [c.mirrored() for c in crops]
    return values, [c.sizes() for c in crops]


def pixel_values(images: list[Image.Image], cfg: TrainConfig, generator: torch.Generator) -> list[torch.Tensor]:
    return pixels_and_sizes(images, cfg, generator)[0]


@torch.no_grad()
def vae_latents(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z = E(x) * scaling_factor, one draw from the VAE posterior."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return (dist.sample(generator) * vae.config.scaling_factor).float()


def cache_latents(vae: AutoencoderKL, values: list[torch.Tensor], seed: int, batch_size: int = 8) -> list[torch.Tensor]:
    """Encode every image once. We cache ONE posterior sample (not mean/std resampled each step): SD's
    VAE posterior std is ~1e-3 of the latent scale, so resampling changes almost nothing and the cache
    stays a plain tensor (the uncached path samples each step)."""
    generator = torch.Generator(vae.device).manual_seed(seed)
    out = []
    for i in range(0, len(values), batch_size):
        out.extend(vae_latents(vae, torch.stack(values[i:i + batch_size]), generator).cpu())
    return out


@torch.no_grad()
def cache_text_embeddings(tokenizer, text_encoder, prompts: list[str]) -> dict:
    """Frozen text encoder(s): encode each distinct prompt once; prompt -> its row of encode_prompts."""
    unique = list(dict.fromkeys(prompts))
    return dict(zip(unique, split_rows(encode_prompts(tokenizer, text_encoder, unique))))


def batch_indices(n_items: int, batch_size: int, seed: int, micro_step: int, rank: int = 0, world: int = 1) -> list[int]:
    """Data-set items of one micro-batch: a stream of per-epoch permutations seeded by (seed, epoch),
    cut into batches and dealt to processes. A pure function, so a resumed run sees the same data."""
    start = (micro_step * world + rank) * batch_size
    positions = [divmod(p, n_items) for p in range(start, start + batch_size)]
    perms = {e: torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + e)) for e, _ in positions}
    return [int(perms[e][i]) for e, i in positions]


def step_generator(seed: int, micro_step: int, rank: int, device) -> torch.Generator:
    """Generator for the noise/timesteps/VAE draws of one micro-step (counter-based: no state to save)."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, micro_step, rank]).generate_state(1)[0]))


def latents_and_conditioning(batch: dict, models: Models, tokenizer, text_cache: dict | None, latents_cached: bool,
                             generator: torch.Generator, device, text_encoders=None) -> tuple[torch.Tensor, object]:
    """(z, c) for a collated batch, row i of both describing batch["prompts"][i] (instances, then classes).

    c is what the family's UNet takes besides (x_t, t): SD's text hidden states, or a dict of UNet keyword
    arguments (families/<family>.py, unet_conditioning). text_encoders: the trained ones as accelerate
    prepared them (several processes: DDP wrappers, whose backward averages their gradients across
    processes); None = the models' own."""
    values = batch["values"].to(device)
    latents = values if latents_cached else vae_latents(models.vae, values, generator)
    if text_cache is not None:
        text = stack_rows([text_cache[p] for p in batch["prompts"]])
        text = {k: v.to(device) for k, v in text.items()} if isinstance(text, dict) else text.to(device)
    else:
        tokenizers, encoders = text_stack(models, tokenizer)
        text = encode_prompts(tokenizers, encoders if text_encoders is None else text_encoders, batch["prompts"])
    return latents, families.get(models.family).unet_conditioning(text, batch.get("sizes"))


def diffusion_loss(unet, noise_scheduler, latents, cond, cfg: TrainConfig, with_prior: bool,
                   generator: torch.Generator, loss_fn=None) -> tuple[torch.Tensor, dict]:
    """One Monte-Carlo sample of the paper's Eq. 2: x_t = alpha_t x + sigma_t eps, t ~ U{0..T-1}.

    cond: the UNet's conditioning from latents_and_conditioning (a tensor of text hidden states, or a
    dict of UNet keyword arguments). The draws (eps, t) come from `generator` here, outside `loss_fn`
    (noised_loss or its torch.compile'd form): a compiled or graph-captured step then makes exactly the
    eager step's draws, from (seed, step)."""
    noise = loss.sample_noise(latents, cfg.offset_noise, generator=generator)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=latents.device)
    return (loss_fn or noised_loss)(unet, noise_scheduler, latents, cond, noise, t, with_prior,
                                    cfg.prior_loss_weight, cfg.snr_gamma)


def noised_loss(unet, noise_scheduler, latents, cond, noise, t, with_prior: bool, prior_loss_weight: float,
                snr_gamma: float | None) -> tuple[torch.Tensor, dict]:
    """The deterministic rest of the step's forward: x_t, the UNet's prediction, the DreamBooth loss."""
    noisy = noise_scheduler.add_noise(latents, noise, t)
    pred = (unet(noisy, t, **cond) if isinstance(cond, dict) else unet(noisy, t, cond)).sample
    target = loss.diffusion_target(noise_scheduler, latents, noise, t)
    return loss.dreambooth_loss(pred, target, t, noise_scheduler=noise_scheduler, with_prior=with_prior,
                                prior_loss_weight=prior_loss_weight, snr_gamma=snr_gamma)


def divergence_message(value: float, step: int, cfg: TrainConfig, last_checkpoint: Path | None) -> str:
    hints = [f"lower learning_rate (now {cfg.learning_rate:g}, e.g. {cfg.learning_rate / 5:g})"]
    if cfg.mixed_precision == "fp16":
        hints.append("mixed_precision='bf16' (or 'no') instead of 'fp16', whose range overflows")
    hints += [f"keep max_grad_norm small (now {cfg.max_grad_norm:g})", "check the base model's weights are finite"]
    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
    return f"loss became {value} at step {step}; training stopped and nothing of this step was saved ({where}). Try: " + "; ".join(hints) + "."


# --- checkpoints ----------------------------------------------------------------------------------

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
            raise data.InputError(f"{folder / LORA_WEIGHTS} does not match the {prefix[:-1]} LoRA of this config "
                                  f"({problem[:3] or 'no weights'}); resume with the lora_rank / train_text_encoder "
                                  "it was trained with")


# Optimizer states that are tensor subclasses: torchao's low-bit AdamW keeps each state as codes + scales (+ a
# quantisation map). They are stored as those plain tensors plus their flat attributes and rebuilt on load;
# a file can name only these classes (nothing else named in a checkpoint is ever imported).
STATE_SUBCLASSES = ("torchao.optim.subclass_8bit.OptimState8bit", "torchao.optim.subclass_4bit.OptimState4bit",
                    "torchao.optim.subclass_fp8.OptimStateFp8")


def _encode(obj, key: str, tensors: dict):
    """JSON-able copy of a state dict; tensors go to `tensors` (safetensors) and leave a reference."""
    if isinstance(obj, torch.Tensor) and type(obj) is not torch.Tensor:
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if name not in STATE_SUBCLASSES:
            raise TypeError(f"cannot store a {name} at {key} in a training state (known subclasses: {STATE_SUBCLASSES})")
        inner, attrs = obj.__tensor_flatten__()
        return {"__subclass__": name, "tensors": {n: _encode(getattr(obj, n), f"{key}.{n}", tensors) for n in inner},
                "attrs": [{"__dtype__": str(a).removeprefix("torch.")} if isinstance(a, torch.dtype)
                          else list(a) if isinstance(a, torch.Size) else a for a in attrs]}
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone()  # clone: bnb shares its quantization maps between params
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {key} in a training state")


def _decode(obj, tensors: dict):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__subclass__" in obj:
        if obj["__subclass__"] not in STATE_SUBCLASSES:
            raise data.InputError(f"the training state names an unknown tensor class {obj['__subclass__']!r}; "
                                  f"only {STATE_SUBCLASSES} are rebuilt")
        module, _, name = obj["__subclass__"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        attrs = [getattr(torch, a["__dtype__"]) if isinstance(a, dict) else a for a in obj["attrs"]]
        return cls.__tensor_unflatten__({n: _decode(v, tensors) for n, v in obj["tensors"].items()}, attrs, None, None)
    if isinstance(obj, dict):
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_training_state(folder: Path, step: int, optimizer, lr_scheduler, history: list[dict], cfg: TrainConfig,
                        rng_states: list[dict] | None = None) -> None:
    """Optimizer + lr schedule + RNG states as safetensors + JSON (no pickles, so nothing runs on load).

    rng_states: every process's distributed.rng_state() in rank order (distributed.gather_rng_states);
    None = this process's only (one process). Optimizer and schedule are the same on every process.
    """
    rng_states = [distributed.rng_state()] if rng_states is None else rng_states
    tensors = {}
    state = dict(
        global_step=step,
        num_processes=len(rng_states),
        optimizer=_encode(optimizer.state_dict(), "optimizer", tensors),
        lr_scheduler=_encode(lr_scheduler.state_dict(), "lr_scheduler", tensors),
        rng=_encode(rng_states, "rng", tensors),  # rng[r] = process r's python / numpy / torch / cuda states
        history=history,
        config=cfg.to_dict(),  # sample.load_pipeline finds the base model here
    )
    save_file(tensors, folder / STATE_TENSORS)
    (folder / STATE_JSON).write_text(json.dumps(state))


def checkpoint_processes(folder: Path) -> int:
    """How many processes wrote checkpoint `folder` (each process's RNG state is in it)."""
    return json.loads((folder / STATE_JSON).read_text()).get("num_processes", 1)  # 1: before several were stored


def check_processes(folder: Path, num_processes: int) -> None:
    written = checkpoint_processes(folder)
    if written != num_processes:
        raise data.InputError(
            f"{folder} was written by a run of {written} process(es) and this run has {num_processes}: the data "
            "each process sees and its random draws depend on the number of processes, so the resumed run would "
            f"not continue the same training. Resume with {written} process(es) (accelerate launch --num_processes "
            f"{written}), or start a new run (resume=None) and load the weights yourself")


def load_training_state(folder: Path, optimizer, lr_scheduler, rank: int = 0, num_processes: int = 1) -> tuple[int, list[dict]]:
    """Restore optimizer, lr schedule and process `rank`'s RNG states; returns (step, history)."""
    check_processes(folder, num_processes)
    tensors = load_file(folder / STATE_TENSORS)
    state = json.loads((folder / STATE_JSON).read_text())
    optimizer.load_state_dict(_decode(state["optimizer"], tensors))
    lr_scheduler.load_state_dict(_decode(state["lr_scheduler"], tensors))
    if "rng" in state:
        distributed.set_rng_state(_decode(state["rng"], tensors)[rank])
    else:  # written before every process's state was stored: one process, flat keys
        distributed.set_rng_state(dict(python=state["rng_python"], numpy=state["rng_numpy"], torch=tensors["rng.torch"],
                                       cuda=[tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]))
    return state["global_step"], state["history"]


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete checkpoint-N (half-written .tmp-checkpoint-N folders never count)."""
    done = [p for p in Path(output_dir).glob("checkpoint-*") if (p / STATE_JSON).is_file()]
    return max(done, key=checkpoint_step, default=None)


def resolve_resume(cfg: TrainConfig, log=print, num_processes: int = 1) -> Path | None:
    """The checkpoint to resume from (None: a new run), checked before any model is loaded: its files
    are whole (check_checkpoint), it was written by as many processes, it holds the weights cfg trains.

    resume="latest" never skips a damaged newest checkpoint on its own: the error names it and the
    newest earlier complete one, so the user decides to go back (and lose those steps) knowingly."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        path = latest_checkpoint(cfg.output_dir)
        if path is None:
            log(f"resume='latest': no checkpoint in {cfg.output_dir}; starting a new run")
            return None
    else:
        path = Path(cfg.resume)
        if not (path / STATE_JSON).is_file():
            raise data.InputError(f"resume={cfg.resume!r}: no {STATE_JSON} there; pass a checkpoint-N folder or 'latest'")
    check_checkpoint(path)
    check_processes(path, num_processes)  # before anything is loaded
    weights = path / LORA_WEIGHTS if cfg.use_lora else path / "unet"
    if not weights.exists():
        raise data.InputError(f"{path} holds no {weights.name} (use_lora={cfg.use_lora} needs it): it was saved by a "
                              f"{'full fine-tune' if cfg.use_lora else 'LoRA run'}; resume with the use_lora it was trained with")
    return path


def checkpoint_damage(folder: Path) -> str | None:
    """Why checkpoint `folder` cannot be read whole ("<file>: <reason>"), or None. Every .json must parse
    and every .safetensors header must describe exactly the file's bytes (safetensors checks that when
    opening), which a truncated, emptied or overwritten file fails. Headers only: seconds for several GB.
    Flipped bits inside tensor data of the right length are not found (checkpoints store no checksums)."""
    required = [folder / STATE_JSON, folder / STATE_TENSORS]
    for path in required + sorted(p for p in folder.rglob("*") if p.suffix in (".json", ".safetensors") and p not in required):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            else:
                with safe_open(path, "pt"):
                    pass
        except FileNotFoundError:
            return f"{path} is missing"
        except (ValueError, SafetensorError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return f"{path} is cut short or corrupt: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


def earlier_intact_checkpoint(folder: Path) -> Path | None:
    """The newest complete, undamaged checkpoint-N beside `folder` with a smaller step, or None."""
    try:
        below = checkpoint_step(folder)
    except (IndexError, ValueError):  # a folder not named checkpoint-N: any checkpoint beside it
        below = math.inf
    done = [p for p in folder.parent.glob("checkpoint-*") if (p / STATE_JSON).is_file() and p != folder]
    for path in sorted((p for p in done if checkpoint_step(p) < below), key=checkpoint_step, reverse=True):
        if checkpoint_damage(path) is None:
            return path
    return None


def check_checkpoint(folder: Path) -> None:
    """InputError naming the damaged file of checkpoint `folder` and what to resume from instead."""
    damage = checkpoint_damage(folder)
    if damage is None:
        return
    earlier = earlier_intact_checkpoint(folder)
    if earlier is not None:
        instead = (f"The newest earlier complete checkpoint is {earlier}: resume from it with resume={str(earlier)!r} "
                   f"(CLI: --resume {earlier}), or delete {folder} and resume='latest' will pick it")
    else:
        instead = (f"No earlier complete checkpoint is in {folder.parent}: delete {folder} and start a new run "
                   "(resume=None)")
    raise data.InputError(f"checkpoint {folder} is damaged and cannot be resumed ({damage}); a disk that filled up "
                          f"or a copy that stopped early leaves files like this. {instead}.")


def fsync(path: Path) -> None:
    """Flush one file's (or folder's entries') bytes to the disk: os.replace alone orders nothing, so
    after a power cut a renamed folder could hold empty files. Folders cannot be opened on Windows."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then its folders deepest first, `folder` itself last."""
    paths = sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in [p for p in paths if p.is_file()] + [p for p in paths if p.is_dir()] + [folder]:
        fsync(path)


def publish(tmp: Path, final: Path) -> None:
    """Durable atomic publish, as databases do: fsync what tmp holds, rename it to final (a file or a
    folder that does not exist yet), fsync the parent folder so that the rename itself is on disk."""
    follow_umask(tmp)
    if tmp.is_dir():
        fsync_tree(tmp)
    else:
        fsync(tmp)
    os.replace(tmp, final)
    fsync(final.parent)


def write_text_durably(path: Path, text: str) -> None:
    """A small file (summary, manifest) written whole or not at all."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(text)
        publish(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: the half-written copy only takes what space is left
        raise


def follow_umask(path: Path) -> None:
    """Give the file `path`, or every file under the folder `path`, the mode open() gives a new file
    (0o666 less the process umask). safetensors >= 0.8 writes each file as a temp file created 0600 and
    renames it (safetensors issue #782), so weights were readable by their owner only: on a shared
    machine nobody else could sample them, unlike every other file of the run."""
    mask = os.umask(0o022)  # reading the umask means setting it: put back at once
    os.umask(mask)
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(file, 0o666 & ~mask)


def is_write_failure(err: BaseException) -> bool:
    """An error of the disk rather than of the program: an OSError, or safetensors' I/O error (its own
    exception type, e.g. "I/O error: No space left on device (os error 28)")."""
    return isinstance(err, OSError) or (isinstance(err, SafetensorError) and "I/O error" in str(err))


def write_failure_reason(err: BaseException) -> str:
    """"No space left on device (ENOSPC)" and the like, from an OSError or safetensors' message."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None and (found := re.search(r"os error (\d+)", str(err))):
        code = int(found.group(1))
    if code is None:
        return str(err) or type(err).__name__
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


def save_failed(what: str, path: Path, output_dir: Path, err: BaseException, left: str = "") -> SaveFailed:
    """The error a failed write raises: what and where, why, which checkpoint is intact, how to go on."""
    intact = latest_checkpoint(output_dir)
    if intact is not None:
        resume = (f"{intact} is intact: free space (or move output_dir to a bigger disk), then rerun with "
                  f"resume='latest' (CLI: --resume latest) to continue from step {checkpoint_step(intact)}")
    else:
        resume = "no checkpoint was written before: free space (or pick another output_dir) and start the run again"
    room = ""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) or re.search(r"os error (28|122)\b", str(err)):
        room = (" Less to write: checkpoints_total_limit=1 keeps one checkpoint, use_lora=True saves megabytes "
                "instead of gigabytes, save_precision='fp16' halves a full fine-tune's final pipeline.")
    left = left or "what was half-written was removed"
    failure = SaveFailed(f"could not write {what} {path}: {write_failure_reason(err)}. {left[0].upper() + left[1:]}; "
                         f"{resume}.{room}")
    failure.errno = err.errno if isinstance(err, OSError) else None
    return failure


def save_checkpoint(output_dir: str | Path, step: int, unet, text_encoder, optimizer, lr_scheduler,
                    history: list[dict], cfg: TrainConfig, rng_states: list[dict] | None = None) -> Path:
    """Write checkpoint-N durably (temp folder, fsync, rename, fsync), then prune to checkpoints_total_limit.
    Called by the main process only, with every process's rng_states (see save_training_state)."""
    output_dir = Path(output_dir)
    tmp, final = output_dir / f".tmp-checkpoint-{step}", output_dir / f"checkpoint-{step}"
    old = output_dir / f".old-checkpoint-{step}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(tmp, unet, text_encoder, cfg)
        save_training_state(tmp, step, optimizer, lr_scheduler, history, cfg, rng_states)
        shutil.rmtree(old, ignore_errors=True)  # left by a crash during an earlier re-save
        if final.exists():  # re-saving a step after resuming from an earlier checkpoint
            os.replace(final, old)
        publish(tmp, final)
    except (OSError, SafetensorError) as err:
        if not is_write_failure(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: the half-written folder only takes what is left
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise save_failed(f"checkpoint-{step}", tmp, output_dir, err) from err
    shutil.rmtree(old, ignore_errors=True)
    if cfg.checkpoints_total_limit is not None:
        done = sorted(output_dir.glob("checkpoint-*"), key=checkpoint_step)
        for stale in done[:-cfg.checkpoints_total_limit]:
            shutil.rmtree(stale)
    return final


def save_final(output_dir: str | Path, unet, text_encoder, cfg: TrainConfig) -> Path:
    """LoRA: output_dir/pytorch_lora_weights.safetensors. Full: a complete diffusers pipeline folder.
    Both fsynced; the LoRA file replaces an older one atomically (written beside it, then renamed)."""
    output_dir = Path(output_dir)
    try:
        return _save_final(output_dir, unet, text_encoder, cfg)
    except (OSError, SafetensorError) as err:
        if not is_write_failure(err):
            raise
        shutil.rmtree(output_dir / ".tmp-final", ignore_errors=True)
        if cfg.use_lora:
            raise save_failed("the final LoRA weights", output_dir / LORA_WEIGHTS, output_dir, err) from err
        raise save_failed("the final pipeline into", output_dir, output_dir, err,
                          left="its files there are incomplete until it is written again") from err


def _save_final(output_dir: Path, unet, text_encoder, cfg: TrainConfig) -> Path:
    if cfg.use_lora:
        tmp = output_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(tmp, unet, text_encoder, cfg)
        publish(tmp / LORA_WEIGHTS, output_dir / LORA_WEIGHTS)
        tmp.rmdir()
        return output_dir / LORA_WEIGHTS
    family = families.of(cfg)
    trained = dict(unet=unet)
    if cfg.train_text_encoder:
        trained.update(zip(family.TEXT_ENCODERS, as_tuple(text_encoder)))
    if cfg.vae_model:  # the VAE trained with goes with the weights
        trained["vae"] = families.load_vae(cfg.vae_model)
    if cfg.save_precision == "fp32":
        # Untrained parts are re-read in fp32 rather than copied from the (maybe fp16) live ones.
        pipe = family.PIPELINE.from_pretrained(cfg.pretrained_model, revision=cfg.revision, **trained)
    else:  # every part read straight in the saved dtype (no fp32 copy); trained weights cast into it, tensor by tensor
        dtype = WEIGHT_DTYPES[cfg.save_precision]
        pipe = family.PIPELINE.from_pretrained(cfg.pretrained_model, revision=cfg.revision, dtype=dtype)
        for name, module in trained.items():
            getattr(pipe, name).load_state_dict({k: v.to("cpu", dtype) for k, v in module.state_dict().items()})
    pipe.save_pretrained(output_dir, safe_serialization=True)
    for name in [*pipe.components, "model_index.json"]:  # what save_pretrained wrote (not checkpoints, grids)
        if (output_dir / name).exists():
            follow_umask(output_dir / name)
        if (output_dir / name).is_dir():
            fsync_tree(output_dir / name)
        elif (output_dir / name).is_file():
            fsync(output_dir / name)
    fsync(output_dir)
    return output_dir


# --- disk space -----------------------------------------------------------------------------------
# A full SD1.5 fine-tune's checkpoint is ~5 GB (fp32 UNet + 8-bit Adam states) and its final pipeline
# ~4-5 GB more: on a Colab disk the run would die at its first checkpoint, hours in. So the sizes are
# estimated once the models and optimizer exist (before the first step) and compared with the free space.

def safetensors_bytes(tensors: dict) -> int:
    """Size of a safetensors file of `tensors`: their bytes, plus a header entry each (name, dtype,
    shape, offsets: ~ the name + 80 bytes of JSON)."""
    return 8 + sum(t.numel() * t.element_size() + len(name) + 80 for name, t in tensors.items())


def weights_bytes(trained: list[torch.nn.Module], cfg: TrainConfig) -> int:
    """What save_weights writes for the (unwrapped) trained modules: the LoRA layers in one file with
    each module's LoraConfig as metadata, or each module's state dict + config.json (save_pretrained)."""
    if cfg.use_lora:
        return sum(safetensors_bytes(lora_layers(m)) + 2048 for m in trained)
    return sum(safetensors_bytes(m.state_dict()) + 4096 for m in trained)


def optimizer_state_bytes(optimizer) -> int:
    """What save_training_state writes for the optimizer, known before its first step creates the state.

    torch AdamW: exp_avg, exp_avg_sq in the parameter's dtype and a step. The 8-bit AdamWs (bitsandbytes,
    torchao): a tensor of >= 4096 values keeps each state in 1 byte per value + an fp32 scale per block
    of 256 values + its 256-entry fp32 quantization map; smaller tensors keep fp32 states. Each stored
    tensor also costs a safetensors header entry and a JSON reference (~200 bytes)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    eight_bit = "8bit" in type(inner).__name__
    return sum(adam_state_bytes(p.numel(), p.element_size(), eight_bit) for g in inner.param_groups for p in g["params"])


def adam_state_bytes(n: int, element_size: int, eight_bit: bool) -> int:
    """Saved AdamW state of one parameter tensor of n values (see optimizer_state_bytes)."""
    if eight_bit and n >= 4096:
        states = [n, n, 4 * math.ceil(n / 256), 4 * math.ceil(n / 256), 4 * 256, 4 * 256]
    elif eight_bit:
        states = [4 * n, 4 * n]  # bitsandbytes keeps its step as a JSON number
    else:
        states = [n * element_size, n * element_size, 4]
    return sum(states) + 200 * len(states)


def checkpoint_bytes(trained: list[torch.nn.Module], optimizer, cfg: TrainConfig, num_processes: int = 1) -> int:
    """Estimated size of one checkpoint-N: weights + optimizer + lr schedule, every process's RNG states,
    loss history (at most max_train_steps records) and config."""
    return (weights_bytes(trained, cfg) + optimizer_state_bytes(optimizer) + rng_bytes(num_processes)
            + 160 * cfg.max_train_steps + len(json.dumps(cfg.to_dict())) + 1024)


def rng_bytes(num_processes: int) -> int:
    """The RNG states a checkpoint stores: this process's, encoded as save_training_state does, per process."""
    tensors = {}
    encoded = len(json.dumps(_encode(distributed.rng_state(), "rng", tensors)))
    return num_processes * (encoded + safetensors_bytes(tensors))


def final_bytes(models: Models | None, cfg: TrainConfig, lora_bytes: int = 0) -> int | None:
    """Estimated size of what save_final writes: the LoRA file, or a whole pipeline in save_precision:
    every module (trained or frozen) at that dtype, plus the base model's parts this run did not load
    (e.g. SD1.5's safety_checker, counted from its safetensors headers) and small files (tokenizers,
    configs) as they are in the base model's folder (a hub model's: from the local cache when there).
    models=None: every part from the base model's headers (None when they are not on this machine)."""
    if cfg.use_lora:
        return lora_bytes
    size = {"fp32": 4, "fp16": 2, "bf16": 2}[cfg.save_precision]
    loaded = {} if models is None else {"unet": models.unet, "vae": models.vae,
                                         **dict(zip(families.of(cfg).TEXT_ENCODERS, models.text_encoders))}
    total = sum(t.numel() * size + len(k) + 80 for m in loaded.values() for k, t in m.state_dict().items())
    base = base_model_folder(cfg.pretrained_model, cfg.revision)
    if base is None:
        return None if models is None else total + 4 * 2**20  # tokenizer files and configs
    parts = [k for k, v in families.model_index(str(base)).items() if isinstance(v, list) and v[0] is not None]
    for path in [base / "model_index.json", *(p for part in parts for p in (base / part).rglob("*") if p.is_file())]:
        if path.suffix not in (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx"):
            total += path.stat().st_size
        elif path.suffix == ".safetensors" and "." not in path.stem and path.relative_to(base).parts[0] not in loaded:
            # a part this run did not load ("model.fp16.safetensors": a variant from_pretrained skips)
            total += sum(n * size + 100 for n in safetensors_numels(path))  # + its header entry
    return total


def safetensors_numels(path: Path) -> list[int]:
    """The number of values of each tensor in a safetensors file, from its header (no data read)."""
    with safe_open(path, "pt") as f:
        return [math.prod(f.get_slice(k).get_shape()) for k in f.keys()]


def early_disk_check(cfg: TrainConfig, resume_from: Path | None = None, num_processes: int = 1) -> dict | None:
    """Before class images and models: a full fine-tune's check_disk_space from the base model's
    safetensors headers (fp32 trained weights, 8-bit optimizer states unless optimizer='adamw': the
    smallest the run can write), so a disk that cannot even hold that is refused in seconds. LoRA
    files are megabytes: their exact check comes once the adapters exist (train, check_disk_space).
    Returns check_disk_space's numbers; None where there is nothing to estimate from (LoRA, weights not
    on this machine or not as safetensors)."""
    base = base_model_folder(cfg.pretrained_model, cfg.revision) if not cfg.use_lora else None
    final = final_bytes(None, cfg) if base is not None else None
    if final is None:
        return None
    trained = ["unet", *(families.of(cfg).TEXT_ENCODERS if cfg.train_text_encoder else ())]
    files = [p for part in trained for p in (base / part).glob("*.safetensors") if "." not in p.stem]
    if len({p.parent.name for p in files}) < len(trained):  # weights of a variant or a .bin only: no estimate
        return None
    numels = [n for path in files for n in safetensors_numels(path)]
    eight_bit = cfg.optimizer != "adamw"
    checkpoint = (sum(4 * n + 100 for n in numels) + sum(adam_state_bytes(n, 4, eight_bit) for n in numels)
                  + rng_bytes(num_processes) + 160 * cfg.max_train_steps)
    start_step = json.loads((resume_from / STATE_JSON).read_text())["global_step"] if resume_from else 0
    return check_disk_space(cfg, checkpoint, final, start_step, log=lambda *_: None)  # the warning: once, later


def base_model_folder(model: str, revision: str | None) -> Path | None:
    """A local pipeline folder, or a hub model's cached snapshot; None when it is not on this machine."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # not cached (yet): the estimate then leaves out the parts this run did not load
        return None


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_disk_space(cfg: TrainConfig, checkpoint: int, final: int, start_step: int, log=print, free: int | None = None) -> dict:
    """Refuse a run whose first checkpoint + final weights cannot fit on output_dir's disk; warn when
    all the checkpoints it keeps would not. Returns the numbers (summary["disk"]).

    Checkpoints kept: checkpoints_total_limit (None = all of them), and one more while a new one is
    written before the oldest is pruned. Checkpoints already in output_dir (a resumed run) are in the
    disk's used space; pruning frees them as new ones are written."""
    output_dir = Path(cfg.output_dir).absolute()
    existing_dir = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    free = shutil.disk_usage(existing_dir).free if free is None else free
    every, limit = cfg.checkpointing_steps, cfg.checkpoints_total_limit
    to_write = cfg.max_train_steps // every - start_step // every if every else 0
    old = len([p for p in output_dir.glob("checkpoint-*") if (p / STATE_JSON).is_file()])

    def needed(n: int, keep: int | None) -> int:  # the most new bytes at once: n checkpoints, then the final weights
        if keep is None:
            return n * checkpoint + final
        while_writing = max(0, min(keep + 1, old + n) - old) * checkpoint if n else 0
        return max(while_writing, max(0, min(keep, old + n) - old) * checkpoint + final)

    first, everything = needed(min(to_write, 1), limit), needed(to_write, limit)
    what = "LoRA file" if cfg.use_lora else f"{cfg.save_precision} pipeline"
    numbers = dict(checkpoint_bytes=checkpoint, final_bytes=final, free_bytes=free, needed_bytes=everything)
    if first > free:
        todo = ["free space on that disk", "set output_dir to a disk with more room"]
        if not cfg.use_lora:
            todo.append("train LoRA (use_lora=True: megabytes instead of gigabytes)")
            if cfg.save_precision == "fp32":
                todo.append("save_precision='fp16' (half the final pipeline)")
        if to_write:
            todo.append("checkpointing_steps=0 (no checkpoints; a crash then loses the run)")
        ckpt = f"one checkpoint ({human_bytes(checkpoint)}) + " if to_write else ""
        raise data.InputError(
            f"not enough disk space in output_dir {output_dir}: {ckpt}the final {what} ({human_bytes(final)}) need "
            f"{human_bytes(first)}, {human_bytes(free)} is free (shutil.disk_usage of {existing_dir}). No training "
            "step was run. Do one of: " + "; ".join(todo) + ".")
    if everything > free:
        kept = ("all are kept" if limit is None else
                f"checkpoints_total_limit={limit} keeps {limit}, and {limit + 1} exist while the next is written")
        fits = [k for k in range(1, (limit or to_write) + 1) if needed(to_write, k) <= free]
        hint = f"Set checkpoints_total_limit={fits[-1]}" if fits else "Write fewer checkpoints (checkpointing_steps)"
        log(f"warning: disk space: the {to_write} checkpoints of this run ({human_bytes(checkpoint)} each; {kept}) and "
            f"the final {what} ({human_bytes(final)}) need up to {human_bytes(everything)} in {output_dir}, and "
            f"{human_bytes(free)} is free: the run would stop with an error when the disk fills (earlier checkpoints "
            f"stay intact). {hint}, free space, or move output_dir.")
    return numbers


# --- validation -----------------------------------------------------------------------------------

@torch.no_grad()
def render_validation(models: Models, unet, text_encoder, tokenizer, prompts: list[str], cfg: TrainConfig,
                      path: Path, autocast) -> Path:
    """Grid (one row per prompt, seeds 0..n-1) from the in-memory models: no reload, no weight copy.
    text_encoder: the (unwrapped) text encoder, or a tuple of the family's."""
    family, encoders = families.get(models.family), as_tuple(text_encoder)
    tokenizers = (tokenizer, models.tokenizer_2)[:len(encoders)]
    pipe = family.PIPELINE(
        vae=models.vae, unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config),
        **dict(zip(family.TEXT_ENCODERS, encoders)), **dict(zip(family.TOKENIZERS, tokenizers)), **family.PIPELINE_EXTRAS)
    pipe.set_progress_bar_config(disable=True)
    n = cfg.num_validation_images
    modules = (unet, *encoders)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    # fork_rng: rendering must not move the global RNG that LoRA dropout draws from (exact resume).
    with autocast, torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        images = generate(pipe, [p for p in prompts for _ in range(n)], list(range(n)) * len(prompts),
                          guidance_scale=cfg.validation_guidance_scale,
                          num_inference_steps=cfg.validation_inference_steps, progress=False)
    for m, flag in zip(modules, was_training):
        m.train(flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=len(prompts), cols=n).save(path)
    return path


def optimizer_name(optimizer) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    return f"{type(inner).__module__}.{type(inner).__name__}"


def peak_memory() -> dict:
    """Peak tensor memory, and (CUDA) what the caching allocator reserved: the part nvidia-smi shows."""
    if torch.cuda.is_available():
        return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20, "memory": "cuda max_memory_allocated",
                "peak_memory_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "memory": "process peak RSS",
            "peak_memory_reserved_mb": None}


def unwrap_all(accelerator: Accelerator, modules) -> tuple:
    return tuple(accelerator.unwrap_model(m) for m in modules)


def use_channels_last(setting: bool | str, device) -> bool:
    """channels_last resolved: "auto" = on CUDA (cuDNN's native layout), off elsewhere."""
    return torch.device(device).type == "cuda" if setting == "auto" else bool(setting)


def memory_plan(cfg: TrainConfig, models: Models, device) -> memory.MemoryPlan:
    """cfg's gradient checkpointing and optimizer with "auto" resolved for these models (weights already
    placed in their training dtypes, LoRA attached) on `device` (see memory.plan_memory)."""
    device = torch.device(device)
    modules = (models.unet, *models.text_encoders, models.vae)
    tensors = [t for m in modules for t in itertools.chain(m.parameters(), m.buffers())]
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    free = None
    if device.type == "cuda":  # free now + what these models already hold there = free before they were placed
        free = torch.cuda.mem_get_info(device)[0] + sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)
    trainable = sum(p.numel() for m in trained_modules(models, cfg) for p in m.parameters() if p.requires_grad)
    images = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
    half = 0 if cfg.mixed_precision == "no" else 2
    vae_factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    acts = {c: memory.activation_bytes(models.unet.config, images, cfg.resolution, half or 4, c, vae_factor)
            for c in (False, True)}
    return memory.plan_memory(free, weight_bytes, trainable, acts, half, cfg.gradient_checkpointing, cfg.optimizer)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    if (AcceleratorState._shared_state and AcceleratorState().mixed_precision != cfg.mixed_precision
            and AcceleratorState().num_processes == 1):
        # accelerate keeps one process-wide state; a notebook's second run may want another precision.
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps)


def effective_batch_size(cfg: TrainConfig, num_processes: int) -> int:
    """Images per optimizer step: instances x accumulation x processes, doubled by the class half (prior)."""
    prior = 2 if cfg.with_prior_preservation else 1
    return cfg.train_batch_size * cfg.gradient_accumulation_steps * num_processes * prior


# --- one optimizer step ---------------------------------------------------------------------------

@dataclass
class TrainingState:
    """Everything one optimizer step touches, set up by prepare_training."""
    cfg: TrainConfig
    accelerator: Accelerator
    models: Models  # the live modules (frozen parts cast to the mixed-precision dtype, LoRA attached)
    tokenizer: CLIPTokenizer
    trained: list[torch.nn.Module]  # accelerate-prepared trained modules: unet (, text encoder)
    unet: torch.nn.Module  # trained[0], or its torch.compile wrapper; what the forward pass calls
    text_encoder: torch.nn.Module  # trained[1] when trained, else the frozen one
    params: list[torch.nn.Parameter]  # trainable parameters (clipped together)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    dataset: data.DreamBoothDataset
    text_cache: dict[str, torch.Tensor] | None  # prompt -> embeddings when the text encoder is frozen
    start_step: int = 0  # optimizer steps already done (a resumed run's checkpoint step)
    history: list[dict] = field(default_factory=list)  # one train_step record per optimizer step
    last_checkpoint: Path | None = None  # named by the divergence error
    loss_fn: Callable = None  # noised_loss, or its torch.compile'd form (compile="step")
    memory_plan: memory.MemoryPlan | None = None  # what "auto" checkpointing / optimizer resolved to, and why
    phase_s: dict[str, float] = field(default_factory=dict)  # seconds of set-up phases ("cache"), for summaries


def prepare_training(cfg: TrainConfig, models: Models, accelerator: Accelerator, tokenizer: CLIPTokenizer,
                     instance_values: list[torch.Tensor], instance_prompts: list[str],
                     class_values: list[torch.Tensor] | None = None, class_prompt: str | None = None,
                     resume_from: Path | None = None, log=print, instance_sizes: list[list[int]] | None = None,
                     class_sizes: list[list[int]] | None = None) -> TrainingState:
    """Models (in memory, fp32 as loaded) + preprocessed pixels -> a state ready for train_step.

    Sizes: each picture's data.Crop.sizes() (pixels_and_sizes), which SDXL is conditioned on; None =
    uncropped squares of the pixels' size.

    Frozen parts go to the mixed-precision dtype and trainable weights stay fp32; then LoRA, gradient
    checkpointing, optimizer, lr schedule, accelerate.prepare, optional torch.compile, latent and
    text-embedding caches, and the checkpoint's weights and training state when resuming.
    """
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise ValueError(f"accelerator accumulates {accelerator.gradient_accumulation_steps} micro-steps but "
                         f"gradient_accumulation_steps = {cfg.gradient_accumulation_steps}: use make_accelerator(cfg)")
    with_prior = cfg.with_prior_preservation
    if with_prior and (not class_values or class_prompt is None):
        raise ValueError("with_prior_preservation needs class_values and class_prompt (see class_image_paths)")
    if cfg.resolution is None and instance_values:  # the pixels given are the resolution (memory plan)
        cfg = dataclasses.replace(cfg, resolution=instance_values[0].shape[-1])
    cfg = resolve_auto(cfg)[0]  # "auto" learning rates and LoRA rank (train() logs why)
    family = families.of(cfg)
    if models.family != family.NAME:
        raise data.InputError(f"the models are {models.family!r} components but the config's model is {family.NAME!r} "
                              f"(pretrained_model {cfg.pretrained_model}, model_family {cfg.model_family!r}): "
                              "set model_family to the family of the models")
    device, weight_dtype = accelerator.device, WEIGHT_DTYPES[cfg.mixed_precision]
    set_trainable(models, cfg)
    vae_dtype, why = vae_precision(cfg, family, models.vae, weight_dtype)
    log(f"VAE: {cfg.vae_model or 'the model' + chr(39) + 's own'} in {str(vae_dtype).removeprefix('torch.')} ({why})")
    place(models.vae, device, vae_dtype)
    for text_encoder in models.text_encoders:
        place(text_encoder, device, torch.float32 if cfg.train_text_encoder and not cfg.use_lora else weight_dtype)
    place(models.unet, device, torch.float32 if not cfg.use_lora else weight_dtype)
    if cfg.use_lora:
        add_lora(models.unet, models.text_encoders, cfg)
        cast_training_params(trained_modules(models, cfg), dtype=torch.float32)
    if use_channels_last(cfg.channels_last, device):  # NHWC: cuDNN convolutions without layout conversions
        models.unet.to(memory_format=torch.channels_last)
        models.vae.to(memory_format=torch.channels_last)
    plan = memory_plan(cfg, models, device)
    log(f"memory plan: {plan.reason}")
    if plan.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for text_encoder in models.text_encoders:
                text_encoder.activation_checkpointing_enable()
    if resume_from is not None:
        load_weights(resume_from, models.unet, models.text_encoders, cfg)
    groups = parameter_groups(models, cfg)
    optimizer = make_optimizer(groups, cfg, log, plan.optimizer)
    # Stepped once per optimizer step by train_step (not by accelerate), so warm-up counts optimizer steps.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)
    *trained, optimizer = accelerator.prepare(*trained_modules(models, cfg), optimizer)
    for module in trained:
        module.train()  # from_pretrained gives eval mode, while new LoRA dropout layers start in train mode
    if accelerator.process_index > 0:
        # LoRA dropout draws from the global RNG: seeded alike (for the same LoRA init), every process would
        # drop the same units; from here each has its own stream (seed + rank; rank 0 keeps the one-process one).
        set_seed(cfg.seed, device_specific=True)
    # Compiled after prepare (it wraps whatever prepare returned); checkpoints unwrap trained[0], not this.
    unet, loss_fn = trained[0], noised_loss
    compile_kw = compile_options(cfg, device)
    if cfg.compile == "unet":
        unet = torch.compile(trained[0], **compile_kw)
    elif cfg.compile == "blocks":  # regional: each BasicTransformerBlock compiled once, reused by every copy
        accelerator.unwrap_model(trained[0]).compile_repeated_blocks(**compile_kw)
    elif cfg.compile == "step":  # forward + loss as one graph; AOTAutograd compiles its backward too
        loss_fn = torch.compile(noised_loss, **compile_kw)

    # Data: latents encoded once (cache_latents); text embeddings once when the text encoder is frozen.
    instance_sizes = instance_sizes or square_sizes(instance_values)
    class_sizes = (class_sizes or square_sizes(class_values)) if with_prior else None
    cache_started = time.perf_counter()
    if cfg.cache_latents:
        instance_values = cache_latents(models.vae, instance_values, cfg.seed)
        class_values = cache_latents(models.vae, class_values, cfg.seed + 1) if with_prior else None
    dataset = data.DreamBoothDataset(instance_values, instance_prompts, class_values if with_prior else None,
                                     class_prompt if with_prior else None, instance_sizes, class_sizes)
    text_cache = None if cfg.train_text_encoder else cache_text_embeddings(
        *text_stack(models, tokenizer), instance_prompts + ([class_prompt] if with_prior else []))
    state = TrainingState(cfg, accelerator, models, tokenizer, trained, unet,
                          trained[1] if cfg.train_text_encoder else models.text_encoder,
                          [p for g in groups for p in g["params"]], optimizer, lr_scheduler, dataset, text_cache,
                          last_checkpoint=resume_from, loss_fn=loss_fn, memory_plan=plan,
                          phase_s={"cache": time.perf_counter() - cache_started})
    if resume_from is not None:  # restores the global RNG exactly as it was after the checkpoint's step
        state.start_step, state.history = load_training_state(resume_from, optimizer, lr_scheduler,
                                                              accelerator.process_index, accelerator.num_processes)
    if cfg.compile != "off" and cfg.compile_check:
        check_compiled_gradients(state, log)
    return state


def compile_options(cfg: TrainConfig, device) -> dict:
    """torch.compile keyword arguments for cfg.compile_backend / compile_mode on `device`.

    Inductor on the CPU runs without its layout optimization: with it, inductor makes the graph's
    activations channels-last for mkldnn's convolutions, and torch 2.13's inductor then reads the
    gradient below each of the UNet's upsamplers (nearest neighbour: a scatter-add into a zero buffer)
    before the scatter-add fills it, so every layer below the first upsampler got a zero gradient
    (benchmarks/README.md, "Compiled step: inductor vs eager on the CPU"). A channels-last model
    (channels_last=True) trips it with or without the option: check_compiled_gradients stops such a run.
    """
    if cfg.compile_backend != "inductor":
        return {"backend": cfg.compile_backend}
    if torch.device(device).type == "cpu":
        return {"backend": "inductor",
                "options": {**torch._inductor.list_mode_options(cfg.compile_mode), "layout_optimization": False}}
    return {"backend": "inductor", "mode": cfg.compile_mode}


class CompiledStepMismatch(RuntimeError):
    """torch.compile's step computes other gradients than the eager step (a compiler bug): nothing was trained."""


def check_compiled_gradients(state: TrainingState, log=print, rtol: float = 0.05) -> dict:
    """Compare the compiled step's loss and per-tensor gradient norms with the eager step's, on the first
    micro-batch the run will train on; raises CompiledStepMismatch when they differ, before any weight moves.

    The eager reference is the same code under torch.compiler.set_stance("force_eager"). A tensor differs
    when |compiled - eager| > rtol x eager + 1e-3 x the largest eager norm (float noise, measured: ~1e-6 on
    the CPU in fp32; a compiler bug zeroed whole tensors). Costs one extra forward + backward. The global
    RNG is restored afterwards and gradients cleared: the run trains as if this had not happened. Skipped
    with LoRA dropout (compiled dropout draws its own masks, so the two passes cannot agree).
    """
    cfg, acc = state.cfg, state.accelerator
    if cfg.use_lora and cfg.lora_dropout > 0:
        log("compile check skipped: lora_dropout > 0 (compiled dropout draws other masks than eager)")
        return {}
    micro_step = state.start_step * cfg.gradient_accumulation_steps

    def loss_and_norms():
        loss_value, _ = micro_step_loss(state, micro_step)
        loss_value.backward()  # unscaled (no fp16 GradScaler): the check never steps the optimizer
        norms = torch.stack([p.grad.detach().float().norm() if p.grad is not None else loss_value.new_zeros(())
                             for p in state.params] + [loss_value.detach().float()])
        for p in state.params:
            p.grad = None
        return norms.tolist()

    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with torch.compiler.set_stance("force_eager"):
            *eager, eager_loss = loss_and_norms()
    with torch.random.fork_rng(devices=devices):
        *compiled, compiled_loss = loss_and_norms()
    if not all(map(math.isfinite, eager + [eager_loss])):
        log("compile check skipped: the eager step's loss or gradients are not finite")
        return {}
    names = {id(p): n for module in state.trained for n, p in acc.unwrap_model(module).named_parameters()}
    floor = 1e-3 * max(eager)
    off = [(names.get(id(p), "?"), e, c) for p, e, c in zip(state.params, eager, compiled)
           if not abs(c - e) <= rtol * e + floor]  # "not <=": NaN counts as different
    result = {"loss": [eager_loss, compiled_loss], "tensors_differing": len(off), "tensors": len(eager)}
    if off or not abs(compiled_loss - eager_loss) <= rtol * abs(eager_loss):
        worst = "; ".join(f"{n}: eager {e:.3g}, compiled {c:.3g}" for n, e, c in off[:3])
        raise CompiledStepMismatch(
            f"torch.compile (compile={cfg.compile!r}, backend {cfg.compile_backend!r}, mode {cfg.compile_mode!r}) computes "
            f"another step than eager PyTorch: loss {compiled_loss:.6g} vs {eager_loss:.6g}, gradient norms of {len(off)} "
            f"of {len(eager)} tensors differ by more than {rtol:.0%} ({worst}). Nothing was trained. This is a compiler "
            "bug (see benchmarks/README.md, 'Compiled step'): train with compile='off'"
            + (", or try compile='blocks' (no convolution or upsampler inside)" if cfg.compile != "blocks" else "")
            + "; compile_check=False skips this check.")
    log(f"compile check: compiled step = eager step (loss {compiled_loss:.6g} vs {eager_loss:.6g}; "
        f"{len(eager)} gradient norms within {rtol:.0%})")
    return result


def square_sizes(pixels: list[torch.Tensor]) -> list[list[int]]:
    """Crop.sizes() of pictures used whole: original = target = their size, crop at (0, 0)."""
    return [[*v.shape[-2:], 0, 0, *v.shape[-2:]] for v in pixels]


def vae_precision(cfg: TrainConfig, family, vae: AutoencoderKL, weight_dtype: torch.dtype) -> tuple[torch.dtype, str]:
    """The VAE's dtype and why. SDXL's VAE overflows in fp16 (NaN latents, black images): its config says
    force_upcast, and it then runs in fp32 unless a fixed VAE (vae_model) is named."""
    if cfg.vae_precision != "auto":
        return data.PRIOR_PRECISIONS[cfg.vae_precision], f"vae_precision={cfg.vae_precision!r}"
    if weight_dtype == torch.float16 and family.VAE_FORCE_UPCAST and vae.config.force_upcast:
        return torch.float32, (f"its config says force_upcast: {family.NAME}'s VAE overflows in fp16; "
                               f"vae_model={family.FIXED_VAE_HINT!r} runs in fp16 with less memory")
    return weight_dtype, f"mixed_precision={cfg.mixed_precision!r}"


def micro_step_loss(state: TrainingState, micro_step: int) -> tuple[torch.Tensor, dict]:
    """The forward of one micro-batch: its items and its draws (VAE sample, noise, timesteps) come from
    (seed, micro_step, rank). Returns diffusion_loss's (loss, parts)."""
    cfg, acc = state.cfg, state.accelerator
    gen = step_generator(cfg.seed, micro_step, acc.process_index, acc.device)
    idx = batch_indices(len(state.dataset), cfg.train_batch_size, cfg.seed, micro_step, acc.process_index,
                        acc.num_processes)
    batch = data.collate_examples([state.dataset[i] for i in idx], cfg.with_prior_preservation)
    latents, cond = latents_and_conditioning(batch, state.models, state.tokenizer, state.text_cache,
                                             cfg.cache_latents, gen, acc.device, state.trained[1:] or None)
    return diffusion_loss(state.unet, state.models.noise_scheduler, latents, cond, cfg, cfg.with_prior_preservation,
                          gen, loss_fn=state.loss_fn)


def train_step(state: TrainingState, step: int) -> dict:
    """Optimizer step number `step` (0-based): accumulate -> NaN check -> clip -> optimizer and lr step.

    Returns {"step": step + 1, "loss", "instance_loss", "prior_loss", "lr"} as floats, the losses averaged
    over micro-steps and processes. Reading them is the step's only host-device sync, made once, before
    the optimizer changes any weight, so a NaN/inf stops training with nothing of this step applied.
    """
    cfg, acc = state.cfg, state.accelerator
    accum = cfg.gradient_accumulation_steps
    total = torch.zeros(3, device=acc.device)  # loss, instance_loss, prior_loss (detached)
    for micro in range(accum):
        with acc.accumulate(*state.trained):
            step_loss, parts = micro_step_loss(state, step * accum + micro)
            acc.backward(step_loss)
            total += torch.stack([step_loss.detach(), parts["instance_loss"], parts["prior_loss"]]) / accum
            if acc.sync_gradients:  # the last micro-step: gradients are complete, weights not yet changed
                loss_value, instance_value, prior_value = acc.reduce(total, "mean").tolist()  # same verdict on every rank
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(divergence_message(loss_value, step + 1, cfg, state.last_checkpoint))
                acc.clip_grad_norm_(state.params, cfg.max_grad_norm)
            state.optimizer.step()  # accelerate makes this a no-op until the last micro-step
            state.optimizer.zero_grad(set_to_none=True)
    state.lr_scheduler.step()
    return {"step": step + 1, "loss": loss_value, "instance_loss": instance_value, "prior_loss": prior_value,
            "lr": float(state.lr_scheduler.get_last_lr()[0])}  # float: torchao keeps lr as a tensor


# --- the run --------------------------------------------------------------------------------------

def train(cfg: TrainConfig, log=print, progress: bool = True, models: Models | None = None) -> dict:
    """Run DreamBooth for cfg.max_train_steps optimizer steps; returns the summary written to summary.json.

    models: already-loaded fp32 components (e.g. a notebook's) instead of load_models(cfg); they are
    modified in place. cfg.pretrained_model still supplies the tokenizer, the class-image sampler and,
    for a full fine-tune, the untrained parts of the saved pipeline.
    """
    cfg = families.with_native_resolution(cfg)  # resolution=None: the model's own size (read from its configs)
    cfg, auto_lines = resolve_auto(cfg)  # "auto" learning rates and LoRA rank for this method and model
    data.validate_config(cfg)  # every model-free check, before anything slow
    family = families.check(cfg)  # an unknown model or a setting it cannot take fails here, before any weights load
    started = time.time()
    phase_s, lap = {}, [time.perf_counter()]

    def phase(name: str) -> None:  # seconds since the previous phase ended, into summary["phase_s"]
        now = time.perf_counter()
        phase_s[name], lap[0] = phase_s.get(name, 0.0) + now - lap[0], now

    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    info = log if main else (lambda *a, **k: None)
    distributed.check_launch(info)  # logs the number of processes; refuses N processes that each run alone
    for line in auto_lines:
        info(line)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    set_seed(cfg.seed)  # LoRA init and dropout; per-step draws use step_generator
    output_dir = Path(cfg.output_dir)
    resume_from = resolve_resume(cfg, info, accelerator.num_processes)
    early_disk_check(cfg, resume_from, accelerator.num_processes)  # a full fine-tune's, before class images

    # 1. prompts and data: "a [V] dog" for the subject, "a dog" for the prior; pixels in [-1, 1].
    tokenizer = load_tokenizer(cfg)
    identifier = data.resolve_identifier(tokenizer, cfg.identifier, log=info)
    instance_prompt, class_prompt = data.build_prompts(cfg, identifier)
    instances = data.load_instance_images(cfg.instance_dir, cfg.resolution, cfg.use_captions)
    instance_prompts = data.instance_prompts_for(instances, cfg, identifier)
    with_prior = cfg.with_prior_preservation
    info(run_plan(cfg, family.NAME, len(instances), instance_prompts[0], class_prompt))
    phase("data")
    class_paths = class_image_paths(cfg, class_prompt, log=info) if with_prior else []
    phase("class_images")
    image_gen = torch.Generator().manual_seed(cfg.seed)  # random crops
    inst_values, inst_sizes = pixels_and_sizes([im.image for im in instances], cfg, image_gen)
    inst_prompts = instance_prompts * (2 if cfg.random_flip else 1)
    cls_values, cls_sizes = pixels_and_sizes([Image.open(p).convert("RGB") for p in class_paths], cfg, image_gen)

    phase("data")
    # 2. models, optimizer, caches (and the checkpoint when resuming).
    models = models if models is not None else load_models(cfg)
    phase("load")
    state = prepare_training(cfg, models, accelerator, tokenizer, inst_values, inst_prompts,
                             cls_values if with_prior else None, class_prompt if with_prior else None, resume_from, info,
                             inst_sizes, cls_sizes if with_prior else None)
    trained = list(unwrap_all(accelerator, state.trained))  # before the first step: the checkpoint and final sizes
    disk = check_disk_space(cfg, checkpoint_bytes(trained, state.optimizer, cfg, accelerator.num_processes),
                            final_bytes(state.models, cfg, weights_bytes(trained, cfg)), state.start_step, info)
    info(f"disk: a checkpoint ~{human_bytes(disk['checkpoint_bytes'])}, the final weights ~{human_bytes(disk['final_bytes'])}, "
         f"{human_bytes(disk['free_bytes'])} free for {cfg.output_dir}")
    phase("setup")
    phase_s["setup"] -= state.phase_s["cache"]  # placement, LoRA, optimizer, accelerate.prepare, resume
    phase_s["cache"] = state.phase_s["cache"]
    unet = state.trained[0]  # uncompiled: what checkpoints unwrap and save
    text_encoders = tuple(state.trained[1:]) if cfg.train_text_encoder else state.models.text_encoders
    val_prompts = [data.fill_prompt(p, identifier, cfg.class_noun, "validation_prompts") for p in cfg.validation_prompts] or [instance_prompt]
    step, n_params = state.start_step, sum(p.numel() for p in state.params)
    if resume_from is not None:
        info(f"resumed from {resume_from} at step {step}")
    info(f"training {family.NAME} {'LoRA' if cfg.use_lora else 'full UNet'}{' + text encoder' if cfg.train_text_encoder else ''}: "
         f"{n_params:,} parameters, {len(state.dataset)} items, steps {step}->{cfg.max_train_steps}")
    effective_batch = effective_batch_size(cfg, accelerator.num_processes)
    per_micro = f"({cfg.train_batch_size} instance + {cfg.train_batch_size} class)" if with_prior else f"{cfg.train_batch_size}"
    info(f"effective batch {effective_batch} images per optimizer step = {per_micro} x {cfg.gradient_accumulation_steps} "
         f"accumulation x {accelerator.num_processes} processes (learning_rate {cfg.learning_rate:g} is not scaled by it)")

    # 3. the loop: one optimizer step, then checkpoint / validation at their multiples.
    step_seconds = []
    with tqdm(total=cfg.max_train_steps, initial=step, desc="train", disable=not (progress and main)) as bar:
        while step < cfg.max_train_steps:
            t0 = time.perf_counter()
            record = train_step(state, step)
            step_seconds.append(time.perf_counter() - t0)
            step += 1
            if len(step_seconds) == 3 and step < cfg.max_train_steps:  # from steps 2-3: the 1st carries the warm-up
                left = (cfg.max_train_steps - step) * sum(step_seconds[1:]) / 2
                info(f"training: about {f'{left / 60:.0f} min' if left >= 120 else f'{left:.0f} s'} to go "
                     f"({sum(step_seconds[1:]) / 2:.2f} s per step; checkpoints and validation grids come on top)")
            state.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update()
            if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0:
                rng_states = distributed.gather_rng_states()  # every process's, so each resumes its own stream
                if main:
                    state.last_checkpoint = save_checkpoint(
                        output_dir, step, accelerator.unwrap_model(unet), unwrap_all(accelerator, text_encoders),
                        state.optimizer, state.lr_scheduler, state.history, cfg, rng_states)
                accelerator.wait_for_everyone()
            if cfg.validation_steps and step % cfg.validation_steps == 0:
                if main:
                    render_validation(state.models, accelerator.unwrap_model(unet),
                                      unwrap_all(accelerator, text_encoders), tokenizer, val_prompts, cfg,
                                      output_dir / "validation" / f"step-{step}.png",
                                      accelerator.autocast() if cfg.mixed_precision != "no" else nullcontext())
                accelerator.wait_for_everyone()

    # 4. final weights + summary (main process only).
    accelerator.wait_for_everyone()
    phase("train")  # the loop, checkpoints and validation grids included
    history = state.history
    summary = dict(
        config=cfg.to_dict(), identifier=identifier, instance_prompt=instance_prompt, class_prompt=class_prompt,
        instance_prompts=instance_prompts, num_class_images=len(class_paths), steps=step,
        resumed_from=str(resume_from) if resume_from else None, wall_time_s=time.time() - started,
        # train_step time only: not the first (warm-up / compile) step, checkpoints or validation grids.
        seconds_per_step=sum(step_seconds[1:]) / (len(step_seconds) - 1) if len(step_seconds) > 1 else None,
        final_loss=history[-1]["loss"] if history else None, loss_history=history,
        optimizer=optimizer_name(state.optimizer), memory_plan=state.memory_plan.to_dict(),
        gradient_checkpointing=state.memory_plan.gradient_checkpointing,
        trainable_parameters=n_params, device=str(accelerator.device),
        num_processes=accelerator.num_processes, effective_batch_size=effective_batch, **peak_memory(),
        phase_s=phase_s, disk=disk, model=run_model(cfg, family.NAME))
    if main:
        summary["weights"] = str(save_final(output_dir, accelerator.unwrap_model(unet),
                                            unwrap_all(accelerator, text_encoders), cfg))
        phase("save")
        write_text_durably(output_dir / "summary.json", json.dumps(summary, indent=2))
        info(f"done: {step} steps, final loss {summary['final_loss']}, weights in {summary['weights']}")
    accelerator.wait_for_everyone()
    return summary


def run_plan(cfg: TrainConfig, family: str, n_photos: int, instance_prompt: str, class_prompt: str) -> str:
    """The first line of a run: what it will do, in one sentence."""
    what = f"LoRA rank {cfg.lora_rank}" if cfg.use_lora else "full fine-tune"
    pictures = f"{cfg.train_batch_size} + {cfg.train_batch_size} class" if cfg.with_prior_preservation else f"{cfg.train_batch_size}"
    prior = (f"; first {cfg.num_class_images} class images '{class_prompt}' (reused when already made)"
             if cfg.with_prior_preservation else "; no prior preservation")
    return (f"plan: {what} of {cfg.pretrained_model} ({family}) on {n_photos} photos '{instance_prompt}', "
            f"{cfg.max_train_steps} steps of {pictures} pictures at {cfg.resolution} px{prior}; output in {cfg.output_dir}")


def run_model(cfg: TrainConfig, family: str) -> dict:
    """What summary.json records to load the run again (sample.read_run): local folders as absolute paths."""
    def where(name):
        return str(Path(name).resolve()) if name and Path(name).is_dir() else name
    return dict(pretrained_model=where(cfg.pretrained_model), revision=cfg.revision, family=family,
                vae_model=where(cfg.vae_model))


def finished_or_train(cfg: TrainConfig, log=print) -> dict:
    """The summary of the run already finished in cfg.output_dir, else train(cfg) first.

    For notebooks that reuse an earlier notebook's run and must also work alone. Reuse goes by folder,
    not by config: delete the folder to retrain after changing settings or the base model.
    """
    summary = Path(cfg.output_dir) / "summary.json"
    if not summary.is_file():
        train(cfg, log=log)
    return json.loads(summary.read_text())
