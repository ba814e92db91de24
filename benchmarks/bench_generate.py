"""Class-image generation throughput: images/s for batch sizes 1-16 in fp16 and bf16.

    python benchmarks/bench_generate.py                       # SD1.5 architecture, 512 px, 50 steps, guidance 7.5
    python benchmarks/bench_generate.py --batch-sizes 4 8 --precisions fp16
    python benchmarks/bench_generate.py --smoke               # tiny model on the CPU (fp32), for CI

Images come from `dreambooth_lib.sample.generate`, the batched pipeline call with one seeded CPU
generator per image that the library's class-image generator (`class_images.ensure_class_images`) also makes;
PNG writing is left out here (bench_e2e.py times the whole class-image path, files included).
One batch is generated untimed first (cuDNN/cuBLAS warm-up), then --images images per batch size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

from dreambooth_lib.sample import generate

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CLASS_PROMPT = "a photo of a dog"


def run(pipe, precision: str, batch_size: int, images: int, steps: int, guidance: float, device) -> dict:
    seeds = list(range(images))
    generate(pipe, CLASS_PROMPT, seeds[:batch_size], guidance, steps, batch_size, progress=False)  # warm-up
    common.synchronize(device)
    common.reset_memory(device)
    started = time.perf_counter()
    out = generate(pipe, CLASS_PROMPT, seeds, guidance, steps, batch_size, progress=True)
    common.synchronize(device)
    elapsed = time.perf_counter() - started
    if len(out) != images:
        raise RuntimeError(f"asked for {images} images, got {len(out)}")
    return dict(kind="generate", status="ok", precision=precision, batch_size=batch_size, images=images,
                num_inference_steps=steps, guidance_scale=guidance, resolution=out[0].width,
                seconds=elapsed, images_per_s=images / elapsed, s_per_image=elapsed / images,
                **common.peak_memory_gb(device))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: exercises the code path (CI)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 2 4 8 16 (smoke: 1 2)")
    p.add_argument("--precisions", nargs="+", choices=sorted(DTYPES), help="default fp16 bf16 (smoke: fp32)")
    p.add_argument("--images", type=int, help="timed images per batch size (default 16; smoke 2)")
    p.add_argument("--steps", type=int, help="sampler steps (default 50, the pipeline default; smoke 2)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--results", type=Path, help="JSON list to append to (default benchmarks/results/generate[_smoke].json)")
    args = p.parse_args(argv)
    batch_sizes = args.batch_sizes or ([1, 2] if args.smoke else [1, 2, 4, 8, 16])
    precisions = args.precisions or (["fp32"] if args.smoke else ["fp16", "bf16"])
    images = args.images or (2 if args.smoke else 16)
    steps = args.steps or (2 if args.smoke else 50)
    results = args.results or common.default_results("generate", args.smoke)
    if min(batch_sizes) < 1 or images < 1 or steps < 1:
        p.error("--batch-sizes, --images and --steps must be >= 1")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: the SD1.5-size benchmark needs a GPU; use --smoke for the CPU code-path check")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    with tempfile.TemporaryDirectory() as workdir:
        parts = common.build_components(args.smoke, Path(workdir), device)
    pipe = common.pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    env = common.environment(device)
    records = []
    for precision in precisions:
        pipe.to(dtype=DTYPES[precision])
        for bs in batch_sizes:
            try:
                record = run(pipe, precision, bs, max(images, bs), steps, args.guidance, device)
            except torch.OutOfMemoryError as err:
                record = dict(kind="generate", status=f"failed: OutOfMemoryError: {str(err)[:200]}", precision=precision,
                              batch_size=bs)
            record.update(smoke=args.smoke, **env)
            common.append_results(results, [record])  # one at a time: a later crash keeps earlier results
            records.append(record)
            print({k: record.get(k) for k in ("precision", "batch_size", "status", "images_per_s", "peak_allocated_gb")})
    print(f"results appended to {results}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
