"""One training step: conditioning, caches, the noised forward pass, the DreamBooth loss, the update.
What differs per model family (latents, text, noising, timesteps, the denoiser's call) is asked of
models.family (families/__init__.py lists the questions).

    train_step = for each micro-step: micro_step_loss (batch, z and c, diffusion_loss) -> backward;
                 then NaN check -> gradient clipping -> optimizer and lr step

Exact resume: each random draw of a micro-step (data order, VAE sample, noise, timesteps) comes from a
generator seeded by (seed, micro-step, rank), so a run resumed from checkpoint-N makes the same draws as
an uninterrupted run (checkpoint.py stores the rest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator

from . import data, loss, memory, subjects
from .config import TrainConfig
from .errors import TrainingDiverged
from .families import Models


def encode_prompts(models: Models, prompts: list[str], cfg: TrainConfig, text_encoders=None):
    """Prompts -> the family's text conditioning, batch first, row i for prompts[i]: SD's is CLIP's last
    hidden states [B, L, D]; other families return a dict of tensors (families/<family>.py, encode_prompts).
    text_encoders: the trained ones (family.TRAINED_TEXT_ENCODERS, the first encoders) as accelerate
    prepared them (DDP wrappers); the rest, and all when None, are the models' own."""
    trained = tuple(text_encoders or ())
    encoders = trained + models.text_encoders[len(trained):]
    return models.family.encode_prompts(models.tokenizers, encoders, prompts, cfg)


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


def cache_latents(models: Models, values: list[torch.Tensor], seed: int, batch_size: int = 8) -> list[torch.Tensor]:
    """Encode every image once (the family's encode_latents). We cache ONE posterior sample (not mean/std
    resampled each step): SD's VAE posterior std is ~1e-3 of the latent scale, so resampling changes
    almost nothing and the cache stays a plain tensor (the uncached path samples each step)."""
    generator = torch.Generator(models.vae.device).manual_seed(seed)
    out = []
    for i in range(0, len(values), batch_size):
        out.extend(models.family.encode_latents(models.vae, torch.stack(values[i:i + batch_size]), generator).cpu())
    return out


@torch.no_grad()
def cache_text_embeddings(models: Models, prompts: list[str], cfg: TrainConfig) -> dict:
    """Frozen text encoder(s): encode each distinct prompt once; prompt -> its row of encode_prompts."""
    unique = list(dict.fromkeys(prompts))
    return dict(zip(unique, split_rows(encode_prompts(models, unique, cfg))))


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


def latents_and_conditioning(batch: dict, models: Models, text_cache: dict | None, latents_cached: bool,
                             generator: torch.Generator, device, cfg: TrainConfig, text_encoders=None,
                             ) -> tuple[torch.Tensor, object]:
    """(z, c) for a collated batch, row i of both describing batch["prompts"][i] (instances, then classes).

    c is what the family's denoiser takes besides (x_t, t): SD's text hidden states, or a dict of keyword
    arguments (families/<family>.py, denoiser_conditioning). text_encoders: the trained ones as accelerate
    prepared them (several processes: DDP wrappers, whose backward averages their gradients across
    processes); None = the models' own."""
    values = batch["values"].to(device)
    latents = values if latents_cached else models.family.encode_latents(models.vae, values, generator)
    if text_cache is not None:
        text = stack_rows([text_cache[p] for p in batch["prompts"]])
        text = {k: v.to(device) for k, v in text.items()} if isinstance(text, dict) else text.to(device)
    else:
        text = encode_prompts(models, batch["prompts"], cfg, text_encoders)
    return latents, models.family.denoiser_conditioning(text, batch.get("sizes"), cfg, models.denoiser.config)


def diffusion_loss(family, denoiser, noise_scheduler, latents, cond, cfg: TrainConfig, with_prior: bool,
                   generator: torch.Generator, loss_fn=None) -> tuple[torch.Tensor, dict]:
    """One Monte-Carlo sample of the paper's Eq. 2 with the family's noising: DDPM x_t = alpha_t x +
    sigma_t eps, t ~ U{0..T-1}; flow matching x_t = (1 - s) x + s eps, s from its density.

    cond: the denoiser's conditioning from latents_and_conditioning (a tensor of text hidden states, or a
    dict of keyword arguments). The draws (eps, t) come from `generator` here, outside `loss_fn`
    (noised_loss or its torch.compile'd form): a compiled or graph-captured step then makes exactly the
    eager step's draws, from (seed, step)."""
    noise = loss.sample_noise(latents, cfg.offset_noise, generator=generator)
    t = family.draw_timesteps(noise_scheduler, latents, cfg, generator)
    return (loss_fn or noised_loss)(family, denoiser, noise_scheduler, latents, cond, noise, t, with_prior, cfg)


def noised_loss(family, denoiser, noise_scheduler, latents, cond, noise, t, with_prior: bool,
                cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """The deterministic rest of the step's forward: x_t, the denoiser's prediction, the DreamBooth loss."""
    noisy, target = family.noisy_and_target(noise_scheduler, latents, noise, t)
    pred = family.predict(denoiser, noisy, t, cond)
    return loss.dreambooth_loss(pred, target, t, noise_scheduler=noise_scheduler, with_prior=with_prior,
                                prior_loss_weight=cfg.prior_loss_weight, snr_gamma=cfg.snr_gamma,
                                weighting=family.loss_weighting(noise_scheduler, t, cfg))


def divergence_message(value: float, step: int, cfg: TrainConfig, last_checkpoint: Path | None) -> str:
    hints = [f"lower learning_rate (now {cfg.learning_rate:g}, e.g. {cfg.learning_rate / 5:g})"]
    if cfg.mixed_precision == "fp16":
        hints.append("mixed_precision='bf16' (or 'no') instead of 'fp16', whose range overflows")
    hints += [f"keep max_grad_norm small (now {cfg.max_grad_norm:g})", "check the base model's weights are finite"]
    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
    return f"loss became {value} at step {step}; training stopped and nothing of this step was saved ({where}). Try: " + "; ".join(hints) + "."


@dataclass
class TrainingState:
    """Everything one optimizer step touches, set up by prepare_training."""
    cfg: TrainConfig
    accelerator: Accelerator
    models: Models  # the live modules (frozen parts cast to the mixed-precision dtype, LoRA attached); models.family
    trained: list[torch.nn.Module]  # accelerate-prepared trained modules: the denoiser (, trained text encoders)
    denoiser: torch.nn.Module  # trained[0], or its torch.compile wrapper; what the forward pass calls
    params: list[torch.nn.Parameter]  # trainable parameters (clipped together)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    dataset: data.DreamBoothDataset | subjects.SubjectsDataset
    text_cache: dict[str, torch.Tensor] | None  # prompt -> embeddings when the text encoder is frozen
    start_step: int = 0  # optimizer steps already done (a resumed run's checkpoint step)
    history: list[dict] = field(default_factory=list)  # one train_step record per optimizer step
    last_checkpoint: Path | None = None  # named by the divergence error
    loss_fn: Callable = None  # noised_loss, or its torch.compile'd form (compile="step")
    memory_plan: memory.MemoryPlan | None = None  # what "auto" checkpointing / optimizer resolved to, and why
    phase_s: dict[str, float] = field(default_factory=dict)  # seconds of set-up phases ("cache"), for summaries


def micro_step_loss(state: TrainingState, micro_step: int) -> tuple[torch.Tensor, dict]:
    """The forward of one micro-batch: its items and its draws (VAE sample, noise, timesteps) come from
    (seed, micro_step, rank). Returns diffusion_loss's (loss, parts)."""
    cfg, acc = state.cfg, state.accelerator
    gen = step_generator(cfg.seed, micro_step, acc.process_index, acc.device)
    if isinstance(state.dataset, subjects.SubjectsDataset):  # several subjects: rows cycle them (subjects.fair_rows)
        examples = state.dataset.micro_batch(cfg.train_batch_size, cfg.seed, micro_step, acc.process_index,
                                             acc.num_processes)
    else:
        idx = batch_indices(len(state.dataset), cfg.train_batch_size, cfg.seed, micro_step, acc.process_index,
                            acc.num_processes)
        examples = [state.dataset[i] for i in idx]
    batch = data.collate_examples(examples, cfg.with_prior_preservation)
    latents, cond = latents_and_conditioning(batch, state.models, state.text_cache, cfg.cache_latents, gen,
                                             acc.device, cfg, state.trained[1:] or None)
    return diffusion_loss(state.models.family, state.denoiser, state.models.noise_scheduler, latents, cond, cfg,
                          cfg.with_prior_preservation, gen, loss_fn=state.loss_fn)


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
