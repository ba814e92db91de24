"""DreamBooth fine-tuning (Ruiz et al., CVPR 2023): full fine-tune or LoRA, one process or `accelerate launch`.

    python -m dreambooth_lib train --instance_dir photos/ --class_noun dog --output_dir runs/dog
    accelerate launch -m dreambooth_lib train --config run.json        # several GPUs

`train(cfg)` reads top to bottom: check the config -> prompts, class images, pixels ->
`prepare_training` (models + LoRA, optimizer, accelerate, cached latents / text embeddings) -> loop of
`train_step` (step.py) + checkpoint / validation grid -> final weights + summary.json. Every piece is a
function that notebooks and benchmarks call on their own; each concern has its module:

    validate.py      every model-free check of the config      class_images.py  the prior images x_pr
    models.py        loading, LoRA, optimizer, memory plan      step.py          conditioning, loss, train_step
    checkpoint.py    durable checkpoints, exact resume          disk.py          disk-space estimates and checks
    compiled.py      torch.compile and its correctness check    weights.py       LoRA files / model folders

Several processes: see distributed.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

from . import data, distributed, families, subjects
from .checkpoint import load_training_state, resolve_resume, save_checkpoint, save_final
from .class_images import class_image_paths
from .compiled import check_compiled_gradients, compile_step
from .config import TrainConfig, is_toy_model, resolve_auto
from .disk import check_disk_space, checkpoint_bytes, early_disk_check, final_bytes, human_bytes, weights_bytes
from .errors import InputError
from .fsio import write_text_durably
from .families import Models
from .memory import bf16_hardware_warning, peak_memory, text_encoders_on
from .models import (load_models, load_tokenizer, make_optimizer, optimizer_name, parameter_groups, prepare_models,
                     trained_modules)
from .sample import render_validation
from .step import TrainingState, cache_latents, cache_text_embeddings, noised_loss, train_step
from .validate import validate_config
from .weights import load_weights


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


def unwrap_all(accelerator: Accelerator, modules) -> tuple:
    return tuple(accelerator.unwrap_model(m) for m in modules)


def whole_denoiser(accelerator: Accelerator, denoiser, fsdp: bool):
    """The denoiser as checkpoints and the final save write it: unwrapped; under FSDP gathered whole to the
    main process (None on the others; every process must call)."""
    return distributed.unsharded_copy(accelerator, denoiser) if fsdp else accelerator.unwrap_model(denoiser)


def prepare_training(cfg: TrainConfig, models: Models, accelerator: Accelerator,
                     instance_values: list[torch.Tensor], instance_prompts: list[str],
                     class_values: list[torch.Tensor] | None = None, class_prompt: str | None = None,
                     resume_from: Path | None = None, log=print, instance_sizes: list[list[int]] | None = None,
                     class_sizes: list[list[int]] | None = None, layout: subjects.Layout | None = None) -> TrainingState:
    """Models (in memory, fp32 as loaded) + preprocessed pixels -> a state ready for train_step.

    Sizes: each picture's data.Crop.sizes() (pixels_and_sizes), which SDXL is conditioned on; None =
    uncropped squares of the pixels' size. layout: several subjects (subjects.prepare_subjects): which
    subject / class each value is; the class prompts come from it (class_prompt unused).

    Frozen parts go to the mixed-precision dtype and trainable weights stay fp32; then LoRA, gradient
    checkpointing, optimizer, lr schedule, accelerate.prepare, optional torch.compile, latent and
    text-embedding caches, and the checkpoint's weights and training state when resuming. Under FSDP
    (accelerator.is_fsdp2) the denoiser is sharded by accelerate.prepare.
    """
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise ValueError(f"accelerator accumulates {accelerator.gradient_accumulation_steps} micro-steps but "
                         f"gradient_accumulation_steps = {cfg.gradient_accumulation_steps}: use make_accelerator(cfg)")
    with_prior = cfg.with_prior_preservation
    if with_prior and (not class_values or (class_prompt is None and layout is None)):
        raise ValueError("with_prior_preservation needs class_values and class_prompt (see class_image_paths)")
    if cfg.resolution is None and instance_values:  # the pixels given are the resolution (memory plan)
        cfg = dataclasses.replace(cfg, resolution=instance_values[0].shape[-1])
    cfg = resolve_auto(cfg)[0]  # "auto" learning rates and LoRA rank (train() logs why)
    family = families.of(cfg)
    if models.family is not family:
        raise InputError(f"the models are {models.family.NAME!r} components but the config's model is {family.NAME!r} "
                         f"(pretrained_model {cfg.pretrained_model}, model_family {cfg.model_family!r}): "
                         "set model_family to the family of the models")
    device, fsdp = accelerator.device, accelerator.is_fsdp2
    plan = prepare_models(models, cfg, device, log, accelerator.num_processes if fsdp else 0)
    if resume_from is not None:
        load_weights(resume_from, models.denoiser, models.text_encoders, cfg, family)
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
    denoiser, loss_fn = compile_step(cfg, accelerator, trained[0], noised_loss)  # checkpoints unwrap trained[0]

    # Data: latents encoded once (cache_latents); text embeddings once when the text encoder is frozen.
    instance_sizes = instance_sizes or data.square_sizes(instance_values)
    class_sizes = (class_sizes or data.square_sizes(class_values)) if with_prior else None
    cache_started = time.perf_counter()
    if cfg.cache_latents:
        instance_values = cache_latents(models, instance_values, cfg.seed)
        class_values = cache_latents(models, class_values, cfg.seed + 1) if with_prior else None
    if layout is None:
        dataset = data.DreamBoothDataset(instance_values, instance_prompts, class_values if with_prior else None,
                                         class_prompt if with_prior else None, instance_sizes, class_sizes)
        class_prompts = [class_prompt] if with_prior else []
    else:
        dataset = subjects.SubjectsDataset(instance_values, instance_prompts, layout, class_values if with_prior else None,
                                           instance_sizes, class_sizes)
        class_prompts = layout.class_prompts if with_prior else []
    text_cache = None
    if not cfg.train_text_encoder:  # frozen: each prompt encoded once, the encoders on the device for that moment
        with text_encoders_on(models.text_encoders, device, log):
            text_cache = cache_text_embeddings(models, instance_prompts + class_prompts, cfg)
    # The parameters as the optimizer holds them after prepare: FSDP replaced the module's with sharded ones.
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = TrainingState(cfg, accelerator, models, trained, denoiser, params, optimizer, lr_scheduler, dataset,
                          text_cache, last_checkpoint=resume_from, loss_fn=loss_fn, memory_plan=plan,
                          phase_s={"cache": time.perf_counter() - cache_started})
    if resume_from is not None:  # restores the global RNG exactly as it was after the checkpoint's step
        state.start_step, state.history = load_training_state(resume_from, optimizer, lr_scheduler,
                                                              accelerator.process_index, accelerator.num_processes,
                                                              trained[0] if fsdp else None)
    if cfg.compile != "off" and cfg.compile_check:
        check_compiled_gradients(state, log)
    return state


def train(cfg: TrainConfig, log=print, progress: bool = True, models: Models | None = None) -> dict:
    """Run DreamBooth for cfg.max_train_steps optimizer steps; returns the summary written to summary.json.

    models: already-loaded fp32 components (e.g. a notebook's) instead of load_models(cfg); they are
    modified in place. cfg.pretrained_model still supplies the tokenizer, the class-image sampler and,
    for a full fine-tune, the untrained parts of the saved pipeline.
    """
    cfg = families.with_family_defaults(cfg)  # resolution, guidance, class sampler left to the model: its own (configs only)
    cfg, auto_lines = resolve_auto(cfg)  # "auto" learning rates and LoRA rank for this method and model
    validate_config(cfg)  # every model-free check, before anything slow
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
    fsdp = distributed.check_sharding(accelerator, info)  # an FSDP launch that accelerate set up otherwise: refused
    for line in auto_lines:
        info(line)
    if cfg.mixed_precision == "bf16" and (warning := bf16_hardware_warning(accelerator.device)):
        info(warning)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    set_seed(cfg.seed)  # LoRA init and dropout; per-step draws use step_generator
    output_dir = Path(cfg.output_dir)
    resume_from = resolve_resume(cfg, info, accelerator.num_processes, family, fsdp)
    early_disk_check(cfg, resume_from, accelerator.num_processes, family)  # a full fine-tune's, before class images

    # 1. prompts and data: "a [V] dog" for the subject, "a dog" for the prior; pixels in [-1, 1].
    tokenizer = load_tokenizer(cfg)
    with_prior, layout, records = cfg.with_prior_preservation, None, None
    if cfg.subjects is None:
        identifier = data.resolve_identifier(tokenizer, cfg.identifier, log=info)
        instance_prompt, class_prompt = data.build_prompts(cfg, identifier)
        instances = data.load_instance_images(cfg.instance_dir, cfg.resolution, cfg.use_captions)
        instance_prompts = data.instance_prompts_for(instances, cfg, identifier)
        with_prior = cfg.with_prior_preservation
        info(run_plan(cfg, family.NAME, len(instances), instance_prompts[0], class_prompt))
        phase("data")
        class_paths = class_image_paths(cfg, class_prompt, log=info, family=family) if with_prior else []
        phase("class_images")
        image_gen = torch.Generator().manual_seed(cfg.seed)  # random crops
        inst_values, inst_sizes = data.pixels_and_sizes([im.image for im in instances], cfg, image_gen)
        inst_prompts = instance_prompts * (2 if cfg.random_flip else 1)
        cls_values, cls_sizes = data.pixels_and_sizes([Image.open(p).convert("RGB") for p in class_paths], cfg, image_gen)
        num_class_images = len(class_paths)
    else:  # several subjects: identifiers, prompts, class images per class noun, pixels (subjects.py)
        multi = subjects.prepare_subjects(cfg, tokenizer, torch.Generator().manual_seed(cfg.seed), info, family)
        records, layout, num_class_images = multi.records, multi.layout, multi.num_class_images
        identifier = instance_prompt = class_prompt = instance_prompts = None
        inst_values, inst_sizes, inst_prompts = multi.instance_values, multi.instance_sizes, multi.instance_prompts
        cls_values, cls_sizes = multi.class_values, multi.class_sizes
        info(run_plan(cfg, family.NAME, len(inst_prompts) // (2 if cfg.random_flip else 1),
                      ", ".join(r["instance_prompt"] for r in records), ", ".join(layout.class_prompts)))
    phase("data")
    # 2. models, optimizer, caches (and the checkpoint when resuming).
    models = models if models is not None else load_models(cfg, family, accelerator.device)
    phase("load")
    state = prepare_training(cfg, models, accelerator, inst_values, inst_prompts,
                             cls_values if with_prior else None, class_prompt if with_prior else None, resume_from, info,
                             inst_sizes, cls_sizes if with_prior else None, layout)
    trained = list(unwrap_all(accelerator, state.trained))  # before the first step: the checkpoint and final sizes
    disk = check_disk_space(cfg, checkpoint_bytes(trained, state.optimizer, cfg, accelerator.num_processes),
                            final_bytes(state.models, cfg, weights_bytes(trained, cfg)), state.start_step, info)
    info(f"disk: a checkpoint ~{human_bytes(disk['checkpoint_bytes'])}, the final weights ~{human_bytes(disk['final_bytes'])}, "
         f"{human_bytes(disk['free_bytes'])} free for {cfg.output_dir}")
    phase("setup")
    phase_s["setup"] -= state.phase_s["cache"]  # placement, LoRA, optimizer, accelerate.prepare, resume
    phase_s["cache"] = state.phase_s["cache"]
    denoiser = state.trained[0]  # uncompiled: what checkpoints unwrap and save
    # the text encoders as the pipeline takes them: the trained ones (accelerate-wrapped), then the frozen rest
    text_encoders = tuple(state.trained[1:]) + state.models.text_encoders[len(state.trained) - 1:]
    if records is None:
        val_prompts = [data.fill_prompt(p, identifier, cfg.class_noun, "validation_prompts") for p in cfg.validation_prompts] or [instance_prompt]
    else:  # several subjects: each prompt once per subject
        val_prompts = [data.fill_prompt(p, r["identifier"], r["class_noun"], "validation_prompts")
                       for p in cfg.validation_prompts for r in records] or [r["instance_prompt"] for r in records]
    step, n_params = state.start_step, sum(p.numel() for p in state.params)
    if resume_from is not None:
        info(f"resumed from {resume_from} at step {step}")
    info(f"training {family.NAME} {'LoRA' if cfg.use_lora else 'full ' + family.DENOISER}{' + text encoder' if cfg.train_text_encoder else ''}: "
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
                whole = whole_denoiser(accelerator, denoiser, fsdp)  # FSDP: gathered (a collective), as the optimizer
                optimizer_state = distributed.full_optimizer_state(denoiser, state.optimizer) if fsdp else None
                if main:
                    state.last_checkpoint = save_checkpoint(
                        output_dir, step, whole, unwrap_all(accelerator, text_encoders), state.optimizer,
                        state.lr_scheduler, state.history, cfg, rng_states, family, optimizer_state)
                del whole, optimizer_state
                accelerator.wait_for_everyone()
            if cfg.validation_steps and step % cfg.validation_steps == 0:
                if main or fsdp:  # FSDP: the sharded forward is a collective, so every process renders the grid
                    render_validation(state.models, accelerator.unwrap_model(denoiser),
                                      unwrap_all(accelerator, text_encoders), val_prompts, cfg,
                                      output_dir / "validation" / f"step-{step}.png" if main else None,
                                      accelerator.autocast() if cfg.mixed_precision != "no" else nullcontext())
                accelerator.wait_for_everyone()

    # 4. final weights + summary (main process only).
    accelerator.wait_for_everyone()
    phase("train")  # the loop, checkpoints and validation grids included
    history = state.history
    summary = dict(
        config=cfg.to_dict(), identifier=identifier, instance_prompt=instance_prompt, class_prompt=class_prompt,
        instance_prompts=instance_prompts, num_class_images=num_class_images, steps=step,
        resumed_from=str(resume_from) if resume_from else None, wall_time_s=time.time() - started,
        # train_step time only: not the first (warm-up / compile) step, checkpoints or validation grids.
        seconds_per_step=sum(step_seconds[1:]) / (len(step_seconds) - 1) if len(step_seconds) > 1 else None,
        final_loss=history[-1]["loss"] if history else None, loss_history=history,
        optimizer=optimizer_name(state.optimizer), memory_plan=state.memory_plan.to_dict(),
        gradient_checkpointing=state.memory_plan.gradient_checkpointing,
        trainable_parameters=n_params, device=str(accelerator.device),
        num_processes=accelerator.num_processes, effective_batch_size=effective_batch, **peak_memory(),
        phase_s=phase_s, disk=disk, model=run_model(cfg, family.NAME))
    if records is not None:
        summary["subjects"] = records
    whole = whole_denoiser(accelerator, denoiser, fsdp)
    if main:
        summary["weights"] = str(save_final(output_dir, whole, unwrap_all(accelerator, text_encoders), cfg, family))
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


def where(name: str | None) -> str | None:
    """A model name as summary.json records it: a local folder as its absolute path, a hub id as it is."""
    return str(Path(name).resolve()) if name and Path(name).is_dir() else name


def run_model(cfg: TrainConfig, family: str) -> dict:
    """What summary.json records to load the run again (sample.read_run): local folders as absolute paths."""
    return dict(pretrained_model=where(cfg.pretrained_model), revision=cfg.revision, family=family,
                vae_model=where(cfg.vae_model))


def finished_or_train(cfg: TrainConfig, log=print) -> dict:
    """The summary of the run already finished in cfg.output_dir, else train(cfg) first.

    For notebooks that reuse an earlier notebook's run and must also work alone. Reuse goes by folder,
    not by config: delete the folder to retrain after changing settings. A run of another base model is refused.
    """
    summary = Path(cfg.output_dir) / "summary.json"
    if not summary.is_file():
        train(cfg, log=log)
    done = json.loads(summary.read_text())
    base = done.get("config", {}).get("pretrained_model")  # None: a summary that names no model, taken as it is
    if base is not None and where(base) != where(cfg.pretrained_model):  # its weights would not fit this model
        raise InputError(f"{cfg.output_dir} holds a run of {base}, not of {cfg.pretrained_model}: delete that "
                         "folder, or choose another output_dir")
    return done


def run_dir(runs: str | Path, cfg: TrainConfig, method: str = "lora", prior: bool = True) -> Path:
    """The notebooks' run folder: runs/<subject>-<method>-<prior|noprior> (several subjects: their folder names
    joined by "+"), with the base model's folder name appended for any model but the toy one, so runs of two
    models never share a folder (reused by folder)."""
    subject = ("+".join(Path(s["instance_dir"]).name for s in cfg.subjects) if cfg.subjects
               else Path(cfg.instance_dir).name)
    name = f"{subject}-{method}-{'prior' if prior else 'noprior'}"
    return Path(runs) / (name if is_toy_model(cfg.pretrained_model) else f"{name}-{Path(cfg.pretrained_model).name}")
