"""Class (prior-preservation) images, paper Sec. 3.3 / 4.2: x_pr = x_hat(z, c_pr), made once by the frozen
model from the plain class prompt and kept in a folder with a manifest saying how they were made.

A folder is reused only when its manifest matches (the base model by its weights' fingerprint, the
prompt, resolution, sampler, steps, guidance, seed, dtype, family, VAE); a folder the run manages is
moved aside and regenerated when it does not, a user's own folder is refused with the difference.
Image i has its own seed, so images do not depend on batch size, processes or which already existed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from diffusers import DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from . import distributed, families, memory
from .config import TrainConfig
from .data import IMAGE_EXTENSIONS
from .errors import InputError
from .memory import torch_dtype, use_channels_last

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

MANIFEST_NAME = "manifest.json"


@dataclass
class ClassImageManifest:
    """How the class images of a folder were made; a folder is reused only when this matches."""

    model: str  # as it was named: recorded, not compared (a moved, copied or relatively named model is the same)
    model_weights: str  # weights_fingerprint(model), the model's identity: one retrained in place is another model
    class_prompt: str
    resolution: int
    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    seed: int
    dtype: str = ""  # sampling dtype ("float16"...); ensure_class_images fills it in from its precision and device
    family: str = "sd"  # families.FAMILIES key of the model: a class folder of another family is refused
    vae_model: str | None = None  # the separate VAE that decoded them as it was named (None = the model's own): recorded
    vae_weights: str | None = None  # vae_fingerprint(vae_model), its identity (compared, like model_weights)
    base_quantization: str | None = None  # "nf4" / "int8": drawn by the quantized denoiser a QLoRA run trains on


def sampler_name(scheduler_config: dict) -> str:
    """How the manifest names a sampler: class name, plus the solver for DPM-Solver ("dpmsolver++")."""
    algorithm = scheduler_config.get("algorithm_type")
    return scheduler_config["_class_name"] + (f"({algorithm})" if algorithm else "")


def weights_fingerprint(model: str, revision: str | None = None) -> str:
    """What identifies the weights behind `model`: for a local folder, a SHA-256 over its weight files'
    names and bytes (a few seconds for SD's 4 GB, once per process and state of the files); for a hub id,
    the revision asked for (the hub's cache keeps one snapshot per commit)."""
    folder = Path(model)
    if not folder.is_dir():
        return f"{model}@{revision or 'main'}"
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".ckpt", ".pt"))
    stats = tuple((p.relative_to(folder).as_posix(), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                  for p in files for st in [p.stat()])
    return _hash_weight_files(str(folder.resolve()), stats)


def vae_fingerprint(vae_model: str | None) -> str | None:
    """weights_fingerprint of a separate VAE: of the files families.load_vae reads (a pipeline folder's vae/,
    or the folder itself), so a relative or absolute path, or a copy, is the same VAE; None = the model's own."""
    if not vae_model:
        return None
    nested = Path(vae_model) / "vae"
    return weights_fingerprint(str(nested) if nested.is_dir() else vae_model)


@functools.lru_cache(maxsize=8)
def _hash_weight_files(folder: str, stats: tuple) -> str:
    """Keyed by the files' (name, inode, size, mtime, ctime): validation and class-image generation ask for
    the same folder's fingerprint and hash it once, and a file rewritten since is hashed again."""
    digest = hashlib.sha256()
    for name, *_ in stats:
        digest.update(name.encode())
        with open(Path(folder) / name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


RECORDED_ONLY = ("model", "vae_model")  # manifest fields that describe the images but do not change them


def manifest_differences(made: dict, wanted: dict) -> dict:
    """{field: (folder's value, wanted value)} for the fields that make other images."""
    return {k: (made.get(k), v) for k, v in wanted.items() if k not in RECORDED_ONLY and made.get(k) != v}


def mismatch_message(manifest_path: Path, differ: dict) -> str:
    what = "; ".join(f"{k}: folder has {old!r}, this run wants {new!r}" for k, (old, new) in differ.items())
    return (
        f"class images in {manifest_path.parent} were made differently ({what}), per {manifest_path}. "
        "Point class_dir to another folder (or leave it unset to let the run manage one), "
        "or delete that manifest.json if you know the images fit"
    )


def _class_image_path(class_dir: Path, index: int) -> Path:
    return class_dir / f"{index:05d}.png"


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _move_aside(class_dir: Path) -> Path:
    k = 1
    while (aside := class_dir.with_name(f"{class_dir.name}.replaced-{k}")).exists():
        k += 1
    class_dir.rename(aside)
    class_dir.mkdir()
    return aside


def class_image_dtype(precision: str, device, half: str = "fp16") -> torch.dtype:
    """Sampling dtype of the class images: "auto" is the family's half precision on CUDA (fp16; FLUX bf16)
    and fp32 elsewhere (CPU fp16 is slow or missing)."""
    if precision == "auto":
        return torch_dtype(half) if torch.device(device).type == "cuda" else torch.float32
    return torch_dtype(precision)


def ensure_class_images(
    class_dir: str | Path,
    manifest: ClassImageManifest,
    num_images: int,
    make_pipeline: Callable[[], DiffusionPipeline],
    batch_size: int | str = "auto",
    device=None,
    user_supplied: bool = False,
    log: Callable[[str], None] = print,
    precision: str = "auto",
    channels_last: bool = False,
) -> list[Path]:
    """Make sure `class_dir` holds `num_images` class images made as `manifest` says; return their paths.

    Image i is sampled with its own generator seeded from (seed, i), so an image does not depend on
    the batch size (up to float rounding), the number of processes, or which images already existed.
    The pipeline runs in `class_image_dtype(precision, device)` (recorded in the manifest); load it in
    that dtype to skip a cast. batch_size "auto": memory.class_batch_size for the free device memory.
    """
    state = distributed.process_state()  # several processes (accelerate launch): each generates every N-th missing image
    family = families.get(manifest.family)
    dtype = class_image_dtype(precision, torch.device(device or state.device), family.HALF_DTYPE)
    manifest = dataclasses.replace(manifest, dtype=str(dtype).removeprefix("torch."))
    class_dir = Path(class_dir)
    manifest_path = class_dir / MANIFEST_NAME
    wanted = dataclasses.asdict(manifest)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = _image_files(class_dir)
    made = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    state.wait_for_everyone()  # every rank has looked before the main one changes anything
    if made is None and existing and user_supplied:
        # The user's own class images (real photos, another tool): use them as they are.
        if len(existing) < num_images:
            raise InputError(
                f"class_dir {class_dir} has {len(existing)} images and no {MANIFEST_NAME}, but num_class_images "
                f"is {num_images}: add images, lower num_class_images, or use an empty folder to generate them"
            )
        log(f"using {num_images} of your {len(existing)} class images in {class_dir} (no {MANIFEST_NAME})")
        return existing[:num_images]
    differ = manifest_differences(made or {}, wanted)
    if differ and (made is not None or existing):
        if user_supplied:
            raise InputError(mismatch_message(manifest_path, differ))
        if state.is_main_process:
            aside = _move_aside(class_dir)
            log(f"class images in {class_dir} were made with other settings: moved to {aside}, regenerating")
    if state.is_main_process:
        manifest_path.write_text(json.dumps(wanted, indent=2))  # first, so an interrupted run resumes
    state.wait_for_everyone()

    paths = [_class_image_path(class_dir, i) for i in range(num_images)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        log(f"generating {len(missing)} class images '{manifest.class_prompt}' in {class_dir}")
        device = torch.device(device or state.device)
        _generate(missing[state.process_index :: state.num_processes], paths, manifest, make_pipeline,
                  batch_size, device, dtype, channels_last, show=state.is_local_main_process,
                  log=log if state.is_main_process else (lambda *a: None))
    state.wait_for_everyone()
    return paths


@torch.no_grad()
def _generate(indices, paths, manifest, make_pipeline, batch_size, device, dtype, channels_last, show, log=print) -> None:
    pipe = make_pipeline()
    used = sampler_name({**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__})
    if used != manifest.scheduler:
        raise ValueError(f"make_pipeline samples with {used}, but the manifest says {manifest.scheduler}")
    if pipe.dtype != dtype:  # casting warns in diffusers (modules kept in fp32), so only when needed
        pipe.to(dtype=dtype)
    family = families.get(manifest.family)
    denoiser = getattr(pipe, family.DENOISER)
    resident = memory.place_pipeline(pipe, denoiser, device, log, "class images")
    if channels_last:  # NHWC: cuDNN's native layout, no conversion kernels around each convolution
        denoiser.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.vae.enable_slicing()  # decode one image at a time: VAE memory does not grow with the batch
    pipe.set_progress_bar_config(disable=True)
    if batch_size == "auto":
        batch_size = auto_class_batch_size(pipe, denoiser, family, device, manifest, dtype, len(indices), resident, log)
    calls, steps = -(-len(indices) // batch_size), manifest.num_inference_steps
    rate = "{l_bar}{bar}| {n_fmt}/{total_fmt} sampler steps [{elapsed}<{remaining}]"
    with tqdm(total=calls * steps, desc=f"class images ({len(indices)}, {batch_size} per call)", disable=not show,
              bar_format=rate) as bar:
        progress = step_progress(bar, log, "class images", steps, calls)  # one call can be every image: per step
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            # CPU generators: the same seed gives the same image on any device.
            generators = [torch.Generator("cpu").manual_seed((manifest.seed << 32) + i) for i in batch]
            images = pipe(
                prompt=[manifest.class_prompt] * len(batch),  # by name: Flux2KleinPipeline's first argument is image
                height=manifest.resolution,
                width=manifest.resolution,
                num_inference_steps=steps,
                guidance_scale=manifest.guidance_scale,
                generator=generators,
                callback_on_step_end=progress,
                **family.sampling_kwargs(pipe),
            ).images
            for i, image in zip(batch, images):
                tmp = paths[i].with_suffix(".png.tmp")
                image.save(tmp, format="PNG")
                os.replace(tmp, paths[i])  # atomic: a killed run never leaves a half-written image
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()


def auto_class_batch_size(pipe, denoiser, family, device: torch.device, manifest: ClassImageManifest, dtype: torch.dtype,
                          count: int, resident_bytes: int, log: Callable[[str], None] = print) -> int:
    """class_batch_size "auto": what memory.class_batch_size fits in free CUDA memory (at most 32), or on a CPU
    in the available RAM (at most the `count` images to make: one call for all when they fit).
    resident_bytes: the weights on the GPU while the denoiser runs (memory.place_pipeline's answer)."""
    import psutil  # an accelerate dependency

    kw = dict(guidance=manifest.guidance_scale > 1, vae_factor=pipe.vae_scale_factor, activation_bytes=family.activation_bytes)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + memory.bytes_on_gpu(pipe)
        size = memory.class_batch_size(free, denoiser.config, manifest.resolution, dtype.itemsize, resident_bytes, **kw)
    else:
        free = psutil.virtual_memory().available
        size = memory.class_batch_size(free, denoiser.config, manifest.resolution, dtype.itemsize, 0, most=count, **kw)
    log(f"class images: {size} per sampler call (auto: {free / 1e9:.1f} GB free {'CUDA memory' if device.type == 'cuda' else 'RAM'}, "
        f"{count} to make)")
    return size


def step_progress(bar, log: Callable[[str], None], what: str, steps: int, calls: int):
    """A pipeline callback_on_step_end that moves `bar` one sampler step and logs once, after the first call's
    third step, how long `calls` calls of `steps` steps should take (from its 2nd and 3rd steps: the 1st
    carries the warm-up)."""
    marks = []

    def callback(pipe, step, timestep, kwargs):
        bar.update()
        if len(marks) < 3:
            marks.append(time.perf_counter())
            if len(marks) == 3 and steps > 3:
                seconds = (marks[2] - marks[0]) / 2 * steps * calls
                when = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
                log(f"{what}: about {when} in all ({calls} sampler call(s) of {steps} steps; from the first steps)")
        return kwargs
    return callback


def class_image_paths(cfg: TrainConfig, class_prompt: str, log=print, family=None,
                      default_dir: Path | None = None) -> list[Path]:
    """Generate (or reuse) the prior images x_pr = x_hat(z, c_pr) with the frozen base model (paper Sec. 3.3).
    default_dir: the folder when cfg.class_dir is unset (default <output_dir>/class_images; one per class
    noun in a several-subject run, subjects.default_class_dir)."""
    cfg = families.with_family_defaults(cfg)
    class_dir = Path(cfg.class_dir) if cfg.class_dir else Path(default_dir or Path(cfg.output_dir) / "class_images")
    family = family or families.of(cfg)
    sampler = family.class_sampler_config(cfg.pretrained_model, cfg.revision, cfg.class_sampler)
    manifest = ClassImageManifest(
        model=cfg.pretrained_model, model_weights=weights_fingerprint(cfg.pretrained_model, cfg.revision),
        class_prompt=class_prompt, resolution=cfg.resolution,
        scheduler=sampler_name(sampler), num_inference_steps=cfg.class_inference_steps,
        guidance_scale=cfg.class_guidance_scale, seed=cfg.seed, family=family.NAME, vae_model=cfg.vae_model,
        vae_weights=vae_fingerprint(cfg.vae_model), base_quantization=None if cfg.quantize_base == "no" else cfg.quantize_base)

    device = distributed.process_state().device
    dtype = class_image_dtype(cfg.prior_generation_precision, device, family.HALF_DTYPE)

    def make_pipeline():  # loaded in the sampling dtype: no cast afterwards
        parts = dict(vae=families.load_vae(cfg.vae_model).to(dtype=dtype)) if cfg.vae_model else {}
        if cfg.quantize_base != "no":  # QLoRA: the prior of the frozen base the run trains, and one a 16 GB GPU holds
            parts[family.DENOISER] = family.DENOISER_CLASS.from_pretrained(
                cfg.pretrained_model, subfolder=family.DENOISER, revision=cfg.revision,
                **families.quantized_load(cfg, device, dtype))
        pipe = family.PIPELINE.from_pretrained(cfg.pretrained_model, revision=cfg.revision, dtype=dtype,
                                               **family.PIPELINE_EXTRAS, **parts)
        if cfg.class_sampler == "dpmsolver++":
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(sampler)
        return pipe

    return ensure_class_images(class_dir, manifest, cfg.num_class_images, make_pipeline,
                                    batch_size=cfg.class_batch_size, device=device,
                                    user_supplied=cfg.class_dir is not None, log=log,
                                    precision=cfg.prior_generation_precision,
                                    channels_last=use_channels_last(cfg.channels_last, device))
