"""Sampling from a trained DreamBooth model: load, set LoRA scales, generate with per-image seeds, grids.

    pipe = load_pipeline("runs/dog")                                  # a run: full fine-tune or LoRA (+ its base model)
    pipe = load_pipeline(base_model, lora_dir="runs/dog-lora")        # LoRA on another base model
    pipe = load_pipeline("runs/dog/checkpoint-200")                   # any training checkpoint
    run = read_run("runs/dog")                                        # its base model, family, VAE, identifier, class noun
    set_lora_scales(pipe, denoiser=1.0, text_encoder=0.5)
    prompt = fill_prompt("a photo of {identifier} {class_noun}", run.identifier, run.class_noun)
    save_grid(generate(pipe, prompt, seeds=[0, 1, 2, 3]), 1, 4, "grid.png")
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from . import families, memory
from .checkpoint import STATE_JSON, check_checkpoint
from .config import TrainConfig
from .data import fill_prompt  # noqa: F401  (for the prompts of a run, as above)
from .errors import InputError
from .families import Models, as_tuple
from .memory import bf16_hardware_warning, text_encoders_on, torch_dtype
from .weights import LORA_WEIGHTS

SUMMARY = "summary.json"  # what train writes into a finished run's output_dir


@dataclass
class Run:
    """What a training run's folder says about itself (read_run): enough to load and prompt it again."""
    folder: Path  # the run's output_dir, or one of its checkpoint-N folders
    base_model: str  # pretrained_model it was trained from (a local folder as an absolute path in new runs)
    revision: str | None
    family: str  # families.FAMILIES key, or "auto" (runs from before summaries named it)
    vae_model: str | None  # the separate VAE it was trained with (None = the model's own)
    lora: bool  # LoRA weights on base_model; else the folder is a full pipeline
    identifier: str | None  # the rare token [V] (None: a checkpoint of a run that never finished and picked it)
    class_noun: str
    instance_dir: str  # the subject photos, as the run named them
    resolution: int | None = None  # the side it trained at: what it is sampled at (None: the pipeline's default)
    subjects: list[dict] = field(default_factory=list)  # a several-subject run's (name, identifier, class_noun, instance_dir, ...): pick_subject
    quantize_base: str = "no"  # a QLoRA run's 4-bit / 8-bit base ("nf4", "int8"): load_pipeline's quantize="auto" on CUDA


def is_run(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / SUMMARY).is_file() or (folder / STATE_JSON).is_file()


def read_run(folder: str | Path, check_sources: bool = True) -> Run:
    """The Run of a train output_dir (its summary.json) or checkpoint-N folder (training_state.json, the
    identifier from the run's summary when there is one). Anything else is an InputError saying what it
    expected; so is (check_sources) a LoRA run whose local base model, or a run whose local VAE, is gone."""
    folder = Path(folder)
    if (folder / SUMMARY).is_file():
        summary = json.loads((folder / SUMMARY).read_text())
    elif (folder / STATE_JSON).is_file():
        parent = folder.parent / SUMMARY
        finished = json.loads(parent.read_text()) if parent.is_file() else {}
        summary = {"config": json.loads((folder / STATE_JSON).read_text())["config"],
                   **{k: finished[k] for k in ("identifier", "subjects") if k in finished}}
    else:
        what = ("does not exist" if not folder.exists() else
                "is a diffusers pipeline, not a run: pass it with --model (load_pipeline takes it as it is)"
                if (folder / "model_index.json").is_file() else f"has neither {SUMMARY} nor {STATE_JSON}")
        raise InputError(f"{folder} is not a training run: expected train's output_dir (it writes {SUMMARY} when it "
                         f"ends) or one of its checkpoint-N folders; {folder} {what}")
    cfg = summary["config"]
    model = summary.get("model") or {}  # written since runs record it; older runs: the config as typed
    run = Run(folder=folder, base_model=model.get("pretrained_model", cfg["pretrained_model"]),
              revision=model.get("revision", cfg.get("revision")), family=model.get("family", cfg.get("model_family", "auto")),
              vae_model=model.get("vae_model", cfg.get("vae_model")), lora=bool(cfg.get("use_lora")),
              identifier=summary.get("identifier", cfg.get("identifier")), class_noun=cfg.get("class_noun", ""),
              instance_dir=cfg.get("instance_dir", ""), resolution=cfg.get("resolution"),
              subjects=summary.get("subjects") or [], quantize_base=cfg.get("quantize_base", "no"))
    sources = [("base model", "model", run.base_model), ("VAE", "vae_model", run.vae_model)] if run.lora else []
    for what, flag, path in sources if check_sources else []:  # a full fine-tune's folder holds both
        if path and Path(path).is_absolute() and not Path(path).exists():
            raise InputError(f"run {folder} was trained on the {what} {path}, which is not there any more: "
                             f"pass where it is now with --{flag} (load_pipeline's {flag})")
    return run


def pick_subject(run: Run, name: str | None, needed: bool = True) -> Run:
    """The run as seen by one of its subjects (identifier, class noun, photos: a several-subject run's
    `name`d one). Without a name, a several-subject run is refused when `needed` (a prompt uses
    {identifier}), with the list of its subjects."""
    names = [f"{r['name']} ({r['identifier']} {r['class_noun']})".strip() for r in run.subjects]
    if name is None:
        if run.subjects and needed:
            raise InputError(f"run {run.folder} has several subjects: choose one with --subject NAME, "
                             f"one of: {'; '.join(names)}")
        return run
    if not run.subjects:
        raise InputError(f"--subject {name}: run {run.folder} has one subject; leave --subject out")
    found = [r for r in run.subjects if r["name"] == name]
    if not found:
        raise InputError(f"--subject {name}: run {run.folder} has no such subject; its subjects: {'; '.join(names)}")
    r = found[0]
    return replace(run, identifier=r["identifier"], class_noun=r["class_noun"], instance_dir=r["instance_dir"],
                   subjects=[])


def run_sources(run: Run | None, model: str | None = None, lora_dir: str | Path | None = None,
                vae_model: str | None = None) -> dict:
    """load_pipeline's model, lora_dir and vae_model for a run with a command's flags on top (a flag wins):
    a LoRA run's base model, weights and VAE, or a full fine-tune's folder."""
    if run is None:
        if model is None:
            raise InputError("no model: pass a run folder (train's output_dir) or --model")
        return dict(model=model, lora_dir=lora_dir, vae_model=vae_model)
    if model is None:  # load_pipeline reads the rest from the run
        return dict(model=run.folder, lora_dir=lora_dir, vae_model=vae_model)
    return dict(model=model, lora_dir=lora_dir or (run.folder if run.lora else None),
                vae_model=vae_model or (run.vae_model if run.lora else None))


def load_pipeline(model: str | Path, lora_dir: str | Path | None = None, device=None, dtype=None,
                  adapter_name: str = "subject", model_family: str = "auto", vae_model: str | None = None,
                  quantize: str = "auto", log=print) -> DiffusionPipeline:
    """A run folder (train's output_dir: a LoRA run is loaded on the base model its summary.json names), a
    train.py checkpoint-N folder, or a pipeline folder / hub id, optionally + LoRA weights.

    The pipeline class is the model family's (families.detect: StableDiffusionPipeline for SD 1.x/2.x,
    StableDiffusionXLPipeline for SDXL, FluxPipeline for FLUX.1); vae_model replaces its VAE (a LoRA run's or a
    checkpoint's run's vae_model is used). A LoRA of another family is refused before any weights load (check_lora_fits).
    Default device: CUDA when present; default dtype: the family's half precision on CUDA (fp16; FLUX
    bf16), fp32 on CPU. Per-component LoRA scales: set_lora_scales. The NSFW safety
    checker is not loaded (as in diffusers' DreamBooth scripts): it blacks out false positives,
    which would corrupt the metrics.

    quantize: the denoiser read 4-bit ("nf4") or 8-bit ("int8") by bitsandbytes, the LoRA on top; "auto" = a
    QLoRA run's own base when sampling on CUDA (the model it was trained on, and one a 16 GB GPU holds: FLUX.1's
    bf16 transformer alone is 24 GB), "no" = unquantized. On CUDA a pipeline whose parts do not fit the free
    memory together takes turns on the GPU (memory.place_pipeline; log says so).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts, revision, folder, run_quantization = {}, None, Path(model), "no"
    if (folder / SUMMARY).is_file():  # a finished run
        run = read_run(folder)
        model_family, run_quantization = run.family, run.quantize_base
        if run.lora:
            model, revision, lora_dir, vae_model = run.base_model, run.revision, lora_dir or folder, vae_model or run.vae_model
    checkpoint = (folder / STATE_JSON).is_file()
    if checkpoint:  # checkpoint-N: trained parts here, the rest from the base model it was trained from
        check_checkpoint(folder)  # a damaged file is named, with the checkpoint to use instead
        config = json.loads((folder / STATE_JSON).read_text())["config"]
        model, revision = config["pretrained_model"], config.get("revision")
        model_family = config.get("model_family", model_family)
        vae_model = vae_model or config.get("vae_model")
        run_quantization = config.get("quantize_base", "no")
    family = families.resolve(model_family, str(model), revision)
    dtype = dtype or (torch_dtype(family.HALF_DTYPE) if device.type == "cuda" else torch.float32)
    if dtype == torch.bfloat16 and (warning := bf16_hardware_warning(device)):
        warnings.warn(warning.removeprefix("warning: "), stacklevel=2)
    if checkpoint:
        if (folder / family.DENOISER).is_dir():
            parts[family.DENOISER] = family.DENOISER_CLASS.from_pretrained(folder / family.DENOISER, dtype=dtype)
        index = families.model_index(model, revision)
        for name in family.TEXT_ENCODERS:
            if (folder / name).is_dir():  # of the class the base model's model_index.json names
                parts[name] = getattr(transformers, index[name][1]).from_pretrained(folder / name, dtype=dtype)
        if (folder / LORA_WEIGHTS).is_file():
            lora_dir = lora_dir or folder
    if lora_dir is not None:
        if not (Path(lora_dir) / LORA_WEIGHTS).is_file():
            raise InputError(f"lora_dir {lora_dir} has no {LORA_WEIGHTS}: point it to a LoRA run's output_dir or checkpoint")
        text_parts = check_lora_fits(Path(lora_dir) / LORA_WEIGHTS, str(model), family, revision)
    if vae_model:
        parts["vae"] = families.load_vae(vae_model).to(dtype=dtype)
    quantize = (run_quantization if device.type == "cuda" else "no") if quantize == "auto" else quantize
    if quantize != "no":
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
        settings = TrainConfig(pretrained_model=str(model), use_lora=True, quantize_base=quantize, mixed_precision=precision)
        try:
            families.check_quantization(settings)  # bitsandbytes and a GPU, or what to do
        except InputError as err:
            raise InputError(f"{err}. To sample: load_pipeline(..., quantize='no'), the unquantized base") from err
        parts[family.DENOISER] = family.DENOISER_CLASS.from_pretrained(
            model, subfolder=family.DENOISER, revision=revision, **families.quantized_load(settings, device, dtype))
    pipe = family.PIPELINE.from_pretrained(model, revision=revision, dtype=dtype, **family.PIPELINE_EXTRAS, **parts)
    if lora_dir is not None:
        # diffusers warns that a UNet-only LoRA has no text-encoder keys ("safe to ignore"): known here, not shown.
        with dropped_log("diffusers.loaders.lora_base", "No LoRA keys associated to", when=not text_parts):
            pipe.load_lora_weights(lora_dir, weight_name=LORA_WEIGHTS, adapter_name=adapter_name)
    for component in pipe.components.values():  # the LoRA layers just added start in train mode: with the
        if isinstance(component, torch.nn.Module):  # file's lora_dropout > 0 every image would drop random units
            component.eval()
    pipe.set_progress_bar_config(disable=True)  # generate() shows one bar over all images instead
    memory.place_pipeline(pipe, getattr(pipe, family.DENOISER), device, log, "load_pipeline")
    return pipe


def set_lora_scales(pipe, denoiser: float, text_encoder: float, adapter_name: str = "subject",
                    text_encoder_2: float | None = None) -> None:
    """Absolute per-component LoRA scales (0 = base model, 1 = as trained): the denoiser (UNet or FLUX's
    transformer) and the text encoder(s).

    text_encoder_2: SDXL's second encoder; None = the text_encoder scale (one knob drives both).
    Uses set_adapters only: cross_attention_kwargs={"scale": s} would multiply both components on top.
    A text-encoder scale is ignored when the adapter has no weights for that encoder (FLUX's T5 never has).
    """
    weights = {families.of_pipeline(pipe).DENOISER: denoiser}
    adapters = pipe.get_list_adapters()
    for name, scale in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder if text_encoder_2 is None else text_encoder_2)):
        if adapter_name in adapters.get(name, []):
            weights[name] = scale
    pipe.set_adapters(adapter_name, adapter_weights=weights)


def check_lora_fits(lora_file: str | Path, model: str, family, revision: str | None = None) -> set[str]:
    """Refuse, before any weights load, a LoRA trained for another family (an SD 1.5 LoRA on SDXL or FLUX,
    or the reverse): components the family lacks (unet / transformer / text_encoder_2 keys) or, within
    the UNet families, the width of its cross-attention inputs give it away. Returns the text encoders the
    file has weights for."""
    try:
        with safe_open(str(lora_file), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise InputError(f"LoRA {lora_file} is cut short or corrupt ({str(err).splitlines()[0]}): copy it again, or "
                         "use a checkpoint-N folder of its run (sample / load_pipeline take those too)") from err
    known = {name for f in families.FAMILIES.values() for name in (f.DENOISER, *f.TEXT_ENCODERS)}
    foreign = ({k.split(".")[0] for k in shapes} & known) - {family.DENOISER, *family.TEXT_ENCODERS}  # diffusers-format keys
    problem = (f"it has weights for {sorted(foreign)}, which {family.NAME} models lack" if foreign
               else family.lora_fit_problem(shapes, model, revision))
    if problem:
        raise InputError(f"LoRA {lora_file} was not trained on {model} ({family.NAME}): {problem}. Load it on the base "
                         "model it was trained from (its run's summary.json names pretrained_model)")
    return {k.split(".")[0] for k in shapes} & set(family.TEXT_ENCODERS)


@contextmanager
def dropped_log(logger: str, text: str, when: bool = True):
    """Inside the block (when `when`), records of `logger` containing `text` are dropped; nothing else is."""
    def keep(record):
        return text not in record.getMessage()
    target = logging.getLogger(logger)
    if when:
        target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


@torch.no_grad()
def generate(pipe, prompts: str | list[str], seeds: list[int], guidance_scale: float = 7.5,
             num_inference_steps: int = 25, batch_size: int = 4, negative_prompt: str | None = None,
             progress: bool = True, resolution: int | None = None) -> list[Image.Image]:
    """One image per seed (a str prompt is used for every seed; a list pairs prompts[i] with seeds[i]).

    Each image has its own CPU torch.Generator, so it depends only on its seed and prompt, not on the
    batch it was drawn in or the device. resolution: the side in pixels (None: the pipeline's default,
    which for FLUX is 1024 px whatever the model was trained at).
    """
    prompts = [prompts] * len(seeds) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    size = {} if resolution is None else dict(height=resolution, width=resolution)
    extra = families.of_pipeline(pipe).sampling_kwargs(pipe)
    images = []
    for i in tqdm(range(0, len(seeds), batch_size), desc="sample", disable=not progress):
        chunk = slice(i, i + batch_size)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[chunk]]
        # prompt by name (Flux2KleinPipeline's first argument is image); negative_prompt only when given (it has none)
        negative = {} if negative_prompt is None else dict(negative_prompt=[negative_prompt] * len(generators))
        images += pipe(prompt=prompts[chunk], generator=generators, guidance_scale=guidance_scale,
                       num_inference_steps=num_inference_steps, **negative, **size, **extra).images
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
                  adapter_name: str, resolution: int | None) -> list[Image.Image]:
    """One image per cell {unet, te, guidance} with the same seed; LoRA scales return to 1/1 after."""
    images = []
    for cell in cells:
        set_lora_scales(pipe, cell["unet"], cell["te"], adapter_name)
        images += generate(pipe, prompt, [seed], cell["guidance"], num_inference_steps, progress=False,
                           resolution=resolution)
    set_lora_scales(pipe, 1.0, 1.0, adapter_name)
    return images


def lora_scale_grid(pipe, prompt: str, unet_scales: list[float], te_scales: list[float], seed: int,
                    guidance_scale: float = 7.5, num_inference_steps: int = 25, adapter_name: str = "subject",
                    path: str | Path | None = None, resolution: int | None = None) -> tuple[Image.Image, dict]:
    """Rows: text-encoder scale, columns: UNet scale, same seed everywhere. Scales return to 1/1 after.
    resolution: as generate's (the run's resolution; None: the pipeline's default size)."""
    cells = [dict(row=r, col=c, unet_scale=un, te_scale=te)
             for r, te in enumerate(te_scales) for c, un in enumerate(unet_scales)]
    images = _render_cells(pipe, prompt, seed, [dict(unet=c["unet_scale"], te=c["te_scale"], guidance=guidance_scale)
                                                for c in cells], num_inference_steps, adapter_name, resolution)
    labels = [f"u{c['unet_scale']:g} t{c['te_scale']:g}" for c in cells]
    grid = _grid(images, len(te_scales), len(unet_scales), labels, path)
    return grid, dict(prompt=prompt, seed=seed, unet_scales=list(unet_scales), te_scales=list(te_scales),
                      guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, cells=cells)


def scale_guidance_grid(pipe, prompt: str, scales: list[float], guidance_scales: list[float], seed: int,
                        num_inference_steps: int = 25, adapter_name: str = "subject",
                        path: str | Path | None = None, resolution: int | None = None) -> tuple[Image.Image, dict]:
    """Rows: guidance scale, columns: LoRA scale (UNet and text encoder together), same seed everywhere.
    Labels name the family's guidance knob (GUIDANCE_KNOB): "g" classifier-free, "dg" FLUX.1 [dev]'s distilled
    guidance embedding; params["guidance"] says which."""
    short, knob = families.of_pipeline(pipe).GUIDANCE_KNOB
    cells = [dict(row=r, col=c, lora_scale=s, guidance_scale=g)
             for r, g in enumerate(guidance_scales) for c, s in enumerate(scales)]
    images = _render_cells(pipe, prompt, seed, [dict(unet=c["lora_scale"], te=c["lora_scale"], guidance=c["guidance_scale"])
                                                for c in cells], num_inference_steps, adapter_name, resolution)
    labels = [f"s{c['lora_scale']:g} {short}{c['guidance_scale']:g}" for c in cells]
    grid = _grid(images, len(guidance_scales), len(scales), labels, path)
    return grid, dict(prompt=prompt, seed=seed, scales=list(scales), guidance_scales=list(guidance_scales), guidance=knob,
                      num_inference_steps=num_inference_steps, cells=cells)


def _grid(images, rows, cols, labels, path):
    if path is not None:
        return save_grid(images, rows, cols, path, labels)
    return make_image_grid([_label(im, t) for im, t in zip(images, labels)], rows=rows, cols=cols)


def render_validation(models: Models, denoiser, text_encoder, prompts: list[str], cfg: TrainConfig,
                      path: Path | None, autocast) -> Path | None:
    """Grid (one row per prompt, seeds 0..n-1) from the in-memory models: no reload, no weight copy.
    text_encoder: the (unwrapped) text encoder, or a tuple of the family's. path None: render only (the
    other processes of an FSDP run, whose sharded denoiser needs every process in each forward)."""
    family, encoders = models.family, as_tuple(text_encoder)
    pipe = family.PIPELINE(
        vae=models.vae, scheduler=family.validation_scheduler(models.noise_scheduler), **{family.DENOISER: denoiser},
        **dict(zip(family.TEXT_ENCODERS, encoders)), **dict(zip(family.TOKENIZERS, models.tokenizers)),
        **family.PIPELINE_EXTRAS)
    # The base model's own pipeline settings, as from_pretrained sets them: model_index.json's values that are not
    # components (FLUX.2 [klein]'s is_distilled turns classifier-free guidance off; SD's requires_safety_checker).
    pipe.register_to_config(**{k: v for k, v in families.model_index(cfg.pretrained_model, cfg.revision).items()
                               if not k.startswith("_") and not isinstance(v, list)})
    pipe.set_progress_bar_config(disable=True)
    n = cfg.num_validation_images
    modules = (denoiser, *encoders)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    # fork_rng: rendering must not move the global RNG that LoRA dropout draws from (exact resume).
    with autocast, torch.random.fork_rng(devices=range(torch.cuda.device_count())), \
            text_encoders_on(encoders, models.vae.device):
        # at the training side: a FLUX pipeline's default is 1024 px whatever the model was trained at
        images = generate(pipe, [p for p in prompts for _ in range(n)], list(range(n)) * len(prompts),
                          guidance_scale=cfg.validation_guidance_scale,
                          num_inference_steps=cfg.validation_inference_steps, progress=False, resolution=cfg.resolution)
    for m, flag in zip(modules, was_training):
        m.train(flag)
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=len(prompts), cols=n).save(path)
    return path
