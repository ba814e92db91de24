"""End-to-end DreamBooth time through the library's real entry point: class images + `train(cfg)`.

    python benchmarks/bench_e2e.py                            # 200 class images + 800 steps, SD1.5 architecture, 512 px
    python benchmarks/bench_e2e.py --config lora4-fp16-cached
    python benchmarks/bench_e2e.py --config sdxl-lora4-fp16-cached --class-images 50 --train-steps 200   # SDXL, 1024 px
    python benchmarks/bench_e2e.py --smoke                    # tiny model on the CPU, a few images and steps (CI)
    python benchmarks/bench_e2e.py --config flux-qlora16-nf4-cached-1024 --model-dir DIR --class-images 2 \
        --class-steps 4 --train-steps 4 --validation --memory-cap-gib 15   # FLUX.1 QLoRA as on a 16 GB T4

A random-weight pipeline folder is saved once (SD1.5: ~4.3 GB fp32 in --model-dir, reused by later runs;
its build time is not part of the end-to-end time), 5 random 512 px "photos" stand in for the subject,
then the clock runs over `class_images.class_image_paths` (the class images, as train() makes them) and
`train.train(cfg)` (which finds those images, loads the models, caches, trains and saves the weights).
The config names are bench_train.py's ("-compile" sets TrainConfig.compile = "unet").

Phases in the record (`phase_s`, seconds, adding up to total_s): class_images (generated here, before
train()), then train()'s own `summary["phase_s"]`: data (photos, prompts, the class-image cache check),
load (from_pretrained), setup (placement, LoRA, optimizer, accelerate), cache (latents and text
embeddings), train (the step loop) and save (final weights).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch
from bench_train import parse_name
from PIL import Image

from dreambooth_lib import class_images, data, train, validate
from dreambooth_lib.tiny import save_tiny_pipeline

DEFAULT_MODEL_DIRS = {"sd": Path(tempfile.gettempdir()) / "dreambooth_bench_sd15",
                      "sdxl": Path(tempfile.gettempdir()) / "dreambooth_bench_sdxl",
                      "flux": Path(tempfile.gettempdir()) / "dreambooth_bench_flux"}


def ensure_model(folder: Path, smoke: bool, family: str = "sd") -> float:
    """Save a random pipeline folder (SD1.5, SDXL or FLUX.1 [dev] architecture; tiny with smoke) unless one is there;
    returns seconds spent."""
    started = time.perf_counter()
    if smoke and family == "sd":
        save_tiny_pipeline(folder)
    elif smoke and family == "flux":  # CLIP with 77 positions: diffusers' FLUX script pads CLIP to 77 whatever the
        from diffusers import FluxPipeline  # tokenizer says (FLUX.1's CLIP has 77; tiny.save_tiny_flux_pipeline's 16)
        from dreambooth_lib.tiny import TINY_WORDS, build_tiny_flux_components, write_clip_tokenizer, write_t5_tokenizer
        write_clip_tokenizer(TINY_WORDS, folder / "tokenizer", model_max_length=77)
        write_t5_tokenizer(TINY_WORDS, folder / "tokenizer_2")
        FluxPipeline(**build_tiny_flux_components(0, folder / "tokenizer", folder / "tokenizer_2")).save_pretrained(
            folder, safe_serialization=True)
    elif smoke:
        from dreambooth_lib.tiny import save_tiny_sdxl_pipeline
        save_tiny_sdxl_pipeline(folder)
    elif not (folder / "model_index.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        parts = common.build_components(False, folder, "cuda", family=family)
        pipe = common.pipeline(parts)
        if family == "flux":  # bf16 as released: 33 GB on disk (fp32's 67 GB would not fit the GPU machine's 64 GiB)
            pipe.to(torch.bfloat16)
        pipe.save_pretrained(folder, safe_serialization=True)  # writes tokenizer/ over the draft
        del parts
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def write_photos(folder: Path, n: int, side: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"photo{i}.jpg")


def cap_device_memory(cap_bytes: float) -> None:
    """Act as a GPU of cap_bytes with this process alone on it: torch's allocator refuses to hold more
    (set_per_process_memory_fraction), and torch.cuda.mem_get_info, which the library's placement decisions
    read (class images, text encoders, the memory plan), reports what is left of the cap. A real card also
    loses ~0.3-0.5 GB to the CUDA context, which this does not count."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap_bytes / total)
    torch.cuda.mem_get_info = lambda device=None: (max(0.0, cap_bytes - torch.cuda.memory_reserved(device)), cap_bytes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: exercises the code path (CI)")
    p.add_argument("--config", default="full-fp16-cached", help="a bench_train.py config name")
    p.add_argument("--class-images", type=int, help="default 200 (smoke 2)")
    p.add_argument("--train-steps", type=int, help="default 800 (smoke 3)")
    p.add_argument("--class-batch-size", type=int, help="class-image batch size (default 8; smoke 2)")
    p.add_argument("--model-dir", type=Path, help="where the random pipeline folder is kept (default "
                   f"{DEFAULT_MODEL_DIRS['sd']}, SDXL: {DEFAULT_MODEL_DIRS['sdxl']})")
    p.add_argument("--results", type=Path, help="JSON list to append to (default benchmarks/results/e2e[_smoke].json)")
    p.add_argument("--class-steps", type=int, help="sampler steps per class image (default 50; smoke 2)")
    p.add_argument("--validation", action="store_true", help="one validation grid (1 image) at the last step")
    p.add_argument("--memory-cap-gib", type=float, help="CUDA: act as a GPU of this size (cap_device_memory), e.g. 15 "
                   "for a 16 GB T4 (15.1 GiB usable)")
    args = p.parse_args(argv)
    cfg, *_, note = parse_name(args.config, args.smoke)
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: the SD1.5-size benchmark needs a GPU; use --smoke for the CPU code-path check")
    n_class = args.class_images or (2 if args.smoke else 200)
    steps = args.train_steps or (3 if args.smoke else 800)
    results = args.results or common.default_results("e2e", args.smoke)

    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        family = cfg.model_family
        model_dir = work / "tiny" if args.smoke else args.model_dir or DEFAULT_MODEL_DIRS[family]
        build_s = ensure_model(model_dir, args.smoke, family)
        write_photos(work / "photos", 5, cfg.resolution)
        cfg.pretrained_model, cfg.instance_dir, cfg.output_dir = str(model_dir), str(work / "photos"), str(work / "run")
        cfg.identifier, cfg.num_class_images, cfg.max_train_steps = "sks", n_class, steps
        cfg.class_batch_size = args.class_batch_size or (2 if args.smoke else 8)
        cfg.class_inference_steps = args.class_steps or (2 if args.smoke else 50)
        if args.validation:
            cfg.validation_steps, cfg.num_validation_images = steps, 1
            cfg.validation_inference_steps = cfg.class_inference_steps
            cfg.validation_prompts = ["a photo of {identifier} {class_noun} on the beach"]
        validate.validate_config(cfg)
        _, class_prompt = data.build_prompts(cfg, cfg.identifier)
        if args.memory_cap_gib and torch.cuda.is_available():
            cap_device_memory(args.memory_cap_gib * 2**30)

        started = time.perf_counter()
        class_images.class_image_paths(cfg, class_prompt)
        class_s = time.perf_counter() - started
        class_peak = torch.cuda.max_memory_reserved() / 1e9 if torch.cuda.is_available() else None
        summary = train.train(cfg)  # resets the peak statistics: its peaks are the training run's
        total_s = time.perf_counter() - started

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    inner = summary["phase_s"]
    phase_s = {"class_images": class_s, "data": inner["data"] + inner["class_images"],
               **{k: inner[k] for k in ("load", "setup", "cache", "train", "save")}}
    record = dict(
        kind="e2e", status="ok", config=args.config, smoke=args.smoke, note=note, mixed_precision=cfg.mixed_precision,
        resolution=cfg.resolution, class_images=n_class, class_batch_size=cfg.class_batch_size,
        class_inference_steps=cfg.class_inference_steps, class_images_s=class_s, train_steps=summary["steps"],
        train_s=total_s - class_s, seconds_per_step=summary["seconds_per_step"], total_s=total_s,
        train_peak_memory_gb=summary["peak_memory_mb"] * 2**20 / 1e9, train_peak_memory_kind=summary["memory"],
        train_peak_reserved_gb=summary["peak_memory_reserved_mb"] and summary["peak_memory_reserved_mb"] * 2**20 / 1e9,
        final_loss=summary["final_loss"], optimizer=summary["optimizer"], model_build_s=build_s, phase_s=phase_s,
        memory_cap_gib=args.memory_cap_gib if device == "cuda" else None, class_images_peak_reserved_gb=class_peak,
        validation=args.validation, memory_plan=summary.get("memory_plan"),
        class_images_per_s=n_class / class_s,
        **common.environment(device),
    )
    common.append_results(results, [record])
    print({k: record[k] for k in ("config", "class_images_s", "train_s", "total_s", "phase_s")})
    print(f"results appended to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
