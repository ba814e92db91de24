"""Sampling from a trained DreamBooth model: load, set LoRA scales, generate with per-image seeds, grids.

    pipe = load_pipeline("runs/dog")                                  # full fine-tune (a pipeline folder)
    pipe = load_pipeline(base_model, lora_dir="runs/dog-lora")        # LoRA on top of the base model
    pipe = load_pipeline("runs/dog/checkpoint-200")                   # any training checkpoint
    set_lora_scales(pipe, unet=1.0, text_encoder=0.5)
    save_grid(generate(pipe, "a photo of sks dog", seeds=[0, 1, 2, 3]), 1, 4, "grid.png")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from . import families
from .checkpoint import STATE_JSON, check_checkpoint
from .config import TrainConfig
from .errors import InputError
from .families import Models, as_tuple
from .weights import LORA_WEIGHTS


def load_pipeline(model: str | Path, lora_dir: str | Path | None = None, device=None, dtype=None,
                  adapter_name: str = "subject", model_family: str = "auto", vae_model: str | None = None,
                  ) -> DiffusionPipeline:
    """A pipeline folder / hub id, optionally + LoRA weights, or a train.py checkpoint-N folder.

    The pipeline class is the model family's (families.detect: StableDiffusionPipeline for SD 1.x/2.x,
    StableDiffusionXLPipeline for SDXL); vae_model replaces its VAE (a checkpoint's run's vae_model is used).
    A LoRA of another family is refused before any weights load (check_lora_fits).
    Default device: CUDA when present; default dtype: fp16 on CUDA, fp32 on CPU. The NSFW safety
    checker is not loaded (as in diffusers' DreamBooth scripts): it blacks out false positives,
    which would corrupt the metrics.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    parts, revision, folder = {}, None, Path(model)
    checkpoint = (folder / STATE_JSON).is_file()
    if checkpoint:  # checkpoint-N: trained parts here, the rest from the base model it was trained from
        check_checkpoint(folder)  # a damaged file is named, with the checkpoint to use instead
        config = json.loads((folder / STATE_JSON).read_text())["config"]
        model, revision = config["pretrained_model"], config.get("revision")
        model_family = config.get("model_family", model_family)
        vae_model = vae_model or config.get("vae_model")
    family = families.resolve(model_family, str(model), revision)
    if checkpoint:
        if (folder / "unet").is_dir():
            parts["unet"] = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype)
        index = families.model_index(model, revision)
        for name in family.TEXT_ENCODERS:
            if (folder / name).is_dir():  # of the class the base model's model_index.json names
                parts[name] = getattr(transformers, index[name][1]).from_pretrained(folder / name, dtype=dtype)
        if (folder / LORA_WEIGHTS).is_file():
            lora_dir = lora_dir or folder
    if lora_dir is not None:
        if not (Path(lora_dir) / LORA_WEIGHTS).is_file():
            raise InputError(f"lora_dir {lora_dir} has no {LORA_WEIGHTS}: point it to a LoRA run's output_dir or checkpoint")
        check_lora_fits(Path(lora_dir) / LORA_WEIGHTS, str(model), family, revision)
    if vae_model:
        parts["vae"] = families.load_vae(vae_model).to(dtype=dtype)
    pipe = family.PIPELINE.from_pretrained(model, revision=revision, dtype=dtype, **family.PIPELINE_EXTRAS, **parts)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, weight_name=LORA_WEIGHTS, adapter_name=adapter_name)
    for component in pipe.components.values():  # the LoRA layers just added start in train mode: with the
        if isinstance(component, torch.nn.Module):  # file's lora_dropout > 0 every image would drop random units
            component.eval()
    pipe.set_progress_bar_config(disable=True)  # generate() shows one bar over all images instead
    return pipe.to(device)


def set_lora_scales(pipe, unet: float, text_encoder: float, adapter_name: str = "subject",
                    text_encoder_2: float | None = None) -> None:
    """Absolute per-component LoRA scales (0 = base model, 1 = as trained).

    text_encoder_2: SDXL's second encoder; None = the text_encoder scale (one knob drives both).
    Uses set_adapters only: cross_attention_kwargs={"scale": s} would multiply both components on top.
    A text-encoder scale is ignored when the adapter has no weights for that encoder.
    """
    weights = {"unet": unet}
    adapters = pipe.get_list_adapters()
    for name, scale in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder if text_encoder_2 is None else text_encoder_2)):
        if adapter_name in adapters.get(name, []):
            weights[name] = scale
    pipe.set_adapters(adapter_name, adapter_weights=weights)


def check_lora_fits(lora_file: str | Path, model: str, family, revision: str | None = None) -> None:
    """Refuse, before any weights load, a LoRA trained for another family (an SD 1.5 LoRA on SDXL or the
    reverse): its text-encoder parts or the width of its UNet cross-attention inputs give it away."""
    unet_config = UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision)
    width = unet_config.get("cross_attention_dim")
    try:
        with safe_open(str(lora_file), framework="pt") as f:
            keys = list(f.keys())
            widths = {f.get_slice(k).get_shape()[1] for k in keys
                      if k.startswith("unet.") and "attn2.to_k" in k and ("lora_A" in k or "lora.down" in k)}
    except (SafetensorError, OSError) as err:
        raise InputError(f"LoRA {lora_file} is cut short or corrupt ({str(err).splitlines()[0]}): copy it again, or "
                         "use a checkpoint-N folder of its run (sample / load_pipeline take those too)") from err
    parts = {k.split(".")[0] for k in keys if k.startswith("text_encoder")}  # diffusers-format keys only
    problem = None
    if parts - set(family.TEXT_ENCODERS):
        problem = f"it has weights for {sorted(parts - set(family.TEXT_ENCODERS))}, which {family.NAME} models lack"
    elif isinstance(width, int) and widths and widths != {width}:
        problem = (f"its UNet cross-attention takes {sorted(widths)}-wide text features, this model's {width} "
                   "(SD 1.x: 768, SD 2.x: 1024, SDXL: 2048)")
    if problem:
        raise InputError(f"LoRA {lora_file} was not trained on {model} ({family.NAME}): {problem}. Load it on the base "
                         "model it was trained from (its run's summary.json names pretrained_model)")


@torch.no_grad()
def generate(pipe, prompts: str | list[str], seeds: list[int], guidance_scale: float = 7.5,
             num_inference_steps: int = 25, batch_size: int = 4, negative_prompt: str | None = None,
             progress: bool = True) -> list[Image.Image]:
    """One image per seed (a str prompt is used for every seed; a list pairs prompts[i] with seeds[i]).

    Each image has its own CPU torch.Generator, so it depends only on its seed and prompt, not on the
    batch it was drawn in or the device.
    """
    prompts = [prompts] * len(seeds) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    images = []
    for i in tqdm(range(0, len(seeds), batch_size), desc="sample", disable=not progress):
        chunk = slice(i, i + batch_size)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[chunk]]
        negative = None if negative_prompt is None else [negative_prompt] * len(generators)
        images += pipe(prompts[chunk], negative_prompt=negative, generator=generators, guidance_scale=guidance_scale,
                       num_inference_steps=num_inference_steps).images
    return images


def save_grid(images: list[Image.Image], rows: int, cols: int, path: str | Path, labels: list[str] | None = None) -> Image.Image:
    """Row-major grid PNG; optional labels are drawn in each cell's top-left corner (cells under
    MIN_LABELLED_SIDE pixels are enlarged first, so the label does not hide the picture)."""
    if labels is not None:
        if len(labels) != len(images):
            raise ValueError(f"save_grid: {len(labels)} labels for {len(images)} images")
        images = [_label(im, text) for im, text in zip(images, labels)]
    grid = make_image_grid(images, rows=rows, cols=cols)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


MIN_LABELLED_SIDE = 128  # small pictures (the toy world's 32 px) are enlarged so a label leaves them visible


def _label(image: Image.Image, text: str) -> Image.Image:
    if image.width < MIN_LABELLED_SIDE:
        factor = -(-MIN_LABELLED_SIDE // image.width)  # whole-pixel nearest-neighbour enlargement
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    image = image.copy()
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((2, 2), text)
    draw.rectangle(box, fill="black")
    draw.text((2, 2), text, fill="white")
    return image


def _render_cells(pipe, prompt: str, seed: int, cells: list[dict], num_inference_steps: int,
                  adapter_name: str) -> list[Image.Image]:
    """One image per cell {unet, te, guidance} with the same seed; LoRA scales return to 1/1 after."""
    images = []
    for cell in cells:
        set_lora_scales(pipe, cell["unet"], cell["te"], adapter_name)
        images += generate(pipe, prompt, [seed], cell["guidance"], num_inference_steps, progress=False)
    set_lora_scales(pipe, 1.0, 1.0, adapter_name)
    return images


def lora_scale_grid(pipe, prompt: str, unet_scales: list[float], te_scales: list[float], seed: int,
                    guidance_scale: float = 7.5, num_inference_steps: int = 25, adapter_name: str = "subject",
                    path: str | Path | None = None) -> tuple[Image.Image, dict]:
    """Rows: text-encoder scale, columns: UNet scale, same seed everywhere. Scales return to 1/1 after."""
    cells = [dict(row=r, col=c, unet_scale=un, te_scale=te)
             for r, te in enumerate(te_scales) for c, un in enumerate(unet_scales)]
    images = _render_cells(pipe, prompt, seed, [dict(unet=c["unet_scale"], te=c["te_scale"], guidance=guidance_scale)
                                                for c in cells], num_inference_steps, adapter_name)
    labels = [f"u{c['unet_scale']:g} t{c['te_scale']:g}" for c in cells]
    grid = _grid(images, len(te_scales), len(unet_scales), labels, path)
    return grid, dict(prompt=prompt, seed=seed, unet_scales=list(unet_scales), te_scales=list(te_scales),
                      guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, cells=cells)


def scale_guidance_grid(pipe, prompt: str, scales: list[float], guidance_scales: list[float], seed: int,
                        num_inference_steps: int = 25, adapter_name: str = "subject",
                        path: str | Path | None = None) -> tuple[Image.Image, dict]:
    """Rows: guidance scale, columns: LoRA scale (UNet and text encoder together), same seed everywhere."""
    cells = [dict(row=r, col=c, lora_scale=s, guidance_scale=g)
             for r, g in enumerate(guidance_scales) for c, s in enumerate(scales)]
    images = _render_cells(pipe, prompt, seed, [dict(unet=c["lora_scale"], te=c["lora_scale"], guidance=c["guidance_scale"])
                                                for c in cells], num_inference_steps, adapter_name)
    labels = [f"s{c['lora_scale']:g} g{c['guidance_scale']:g}" for c in cells]
    grid = _grid(images, len(guidance_scales), len(scales), labels, path)
    return grid, dict(prompt=prompt, seed=seed, scales=list(scales), guidance_scales=list(guidance_scales),
                      num_inference_steps=num_inference_steps, cells=cells)


def _grid(images, rows, cols, labels, path):
    if path is not None:
        return save_grid(images, rows, cols, path, labels)
    return make_image_grid([_label(im, t) for im, t in zip(images, labels)], rows=rows, cols=cols)


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
