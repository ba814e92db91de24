"""The one GPU check of issues 11 and 13: our configs beside diffusers' scripts, time-boxed, JSON to --out.

    bash benchmarks/gpu_check.sh                       # on the GPU machine (installs the carried wheels first)
    bash benchmarks/gpu_check.sh --smoke               # CPU rehearsal: tiny models, the same parts and files
    python benchmarks/gpu_check.py --out DIR --parts diffusers_full train_sd15   # some parts only

Parts run in the order of PARTS (most important first), each in its own process(es) under a time box
(`timeout`, or what is left of --budget, whichever is less), so one slow part cannot eat the rest; a part
that runs out of time or fails is recorded as such and the next one starts. Every part writes its own
JSON records into --out (bench_train / bench_e2e / bench_generate records, timed.py records for diffusers'
scripts); gpu_check.json lists the parts (status, seconds, commands) and the side-by-side ratios.

diffusers' example scripts come from the anchors folder (--anchors, default `.anchors/`, a git-ignored
copy of ../shared/bench-anchors carried to the GPU machine): `timed.py` times each of their steps from
outside, with the flags the 2026-11-27 H200 table used; on the CPU `cpu-dry-run/dry.py` runs them without
torchvision. This file only orchestrates: every number comes from the benchmark scripts themselves.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# Ours, SD1.5 architecture (bench_train.py names): issue 11's fast and low-memory modes, then the pre-lever baseline.
TRAIN_SD15 = ["full-fp16-cached-fast", "lora4-fp16-cached-fast", "full-fp16-cached-lowmem", "lora4-fp16-cached-lowmem",
              "full-fp16-cached", "lora4-fp16-cached"]
TRAIN_SMOKE = ["full-fp16-cached-lowmem", "lora4-fp16-cached-fast", "full-fp16-cached"]
# The optimizers for "auto" (issue 11): fused torch AdamW vs bitsandbytes' and torchao's 8-bit AdamW, full UNet.
OPTIMIZERS = ["full-fp16-cached-auto", "full-fp16-cached-bnb8", "full-fp16-cached-torchao8"]
E2E_CONFIG = "full-fp16-cached-fast"  # the "full DreamBooth under 60 s" is for the fast mode
# Ours, SDXL architecture at 1024 px (issue 13): LoRA r4 and full with 8-bit AdamW, fp16 first.
TRAIN_SDXL = ["sdxl-lora4-fp16-cached", "sdxl-full-fp16-cached", "sdxl-lora4-bf16-cached", "sdxl-full-bf16-cached"]
# Ours, FLUX.1 [dev]'s architecture (issue 18): LoRA r16 over the bf16 base, then QLoRA (NF4 base), 1024 px first.
TRAIN_FLUX = ["flux-lora16-bf16-cached-1024", "flux-qlora16-nf4-cached-1024", "flux-lora16-bf16-cached-512",
              "flux-qlora16-nf4-cached-512"]


def flux_anchor_args(inputs: Path, smoke: bool, out_dir: Path) -> list[str]:
    """train_dreambooth_lora_flux.py as our flux-lora16-bf16-cached-1024: r16 on its default targets, bf16,
    8-bit AdamW, checkpointing, cached latents (its prompts are encoded once: no custom captions, frozen text
    encoders), T5 at 512 tokens, training guidance 1.0 (its default is 3.5; the value does not change the work).
    CPU: 32 px, fp32 (its bf16 path is GPU-only), 8 T5 tokens, 4 steps."""
    side, precision, steps, tokens = (32, "no", 4, 8) if smoke else (1024, "bf16", 25, 512)
    return [f"--pretrained_model_name_or_path={inputs / 'model'}", f"--instance_data_dir={inputs / 'photos'}",
            "--instance_prompt=a photo of sks dog", f"--class_data_dir={inputs / 'class'}",
            "--class_prompt=a photo of dog", "--with_prior_preservation", "--prior_loss_weight=1.0",
            "--num_class_images=4", f"--resolution={side}", "--train_batch_size=1", "--gradient_accumulation_steps=1",
            "--gradient_checkpointing", "--use_8bit_adam", f"--mixed_precision={precision}", "--cache_latents",
            "--rank=16", "--learning_rate=1e-4", "--guidance_scale=1.0", f"--max_sequence_length={tokens}",
            "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--max_train_steps={steps}", "--seed=0",
            f"--output_dir={out_dir}"]


def anchor_args(inputs: Path, smoke: bool, out_dir: Path, side: int = 512) -> list[str]:
    """diffusers' flags behind the H200 table (anchors README), on our inputs; CPU: 32 px, fp32, 4 steps."""
    side, precision, steps = (32, "no", 4) if smoke else (side, "fp16", 25)
    return [f"--pretrained_model_name_or_path={inputs / 'model'}", f"--instance_data_dir={inputs / 'photos'}",
            "--instance_prompt=a photo of sks dog", f"--class_data_dir={inputs / 'class'}",
            "--class_prompt=a photo of dog", "--with_prior_preservation", "--prior_loss_weight=1.0",
            "--num_class_images=4", f"--resolution={side}", "--train_batch_size=1", "--gradient_accumulation_steps=1",
            "--gradient_checkpointing", "--use_8bit_adam", f"--mixed_precision={precision}", "--lr_scheduler=constant",
            "--lr_warmup_steps=0", f"--max_train_steps={steps}", "--seed=0", f"--output_dir={out_dir}"]


@dataclass
class Part:
    name: str
    timeout: float  # seconds on the GPU
    smoke_timeout: float  # seconds on the 2-core CPU
    commands: list[list[str]] = field(default_factory=list)


def parts(py: str, out: Path, work: Path, anchors: Path, smoke: bool) -> list[Part]:
    smoke_flag = ["--smoke"] if smoke else []
    inputs, inputs_xl, inputs_flux = work / "sd15", work / "sdxl", work / "flux"
    if smoke:  # the anchors' CPU wrapper: diffusers' scripts without torchvision
        timed = [py, str(anchors / "cpu-dry-run" / "dry.py"), str(anchors / "timed.py")]
        warmup = "1"
    else:
        timed, warmup = [py, str(anchors / "timed.py")], "5"
    examples = anchors / "diffusers-examples"
    train_args = ["--warmup", "1", "--steps", "2", "--profile", "1"] if smoke else \
        ["--warmup", "3", "--steps", "10", "--profile", "2"]
    return [
        Part("inputs", 90, 120, [[py, str(BENCH / "gpu_check.py"), "--make-inputs", str(inputs), *smoke_flag]]),
        Part("train_sd15", 200, 400, [[py, str(BENCH / "bench_train.py"), *smoke_flag, *train_args,
                                       "--results", str(out / "train.json"),
                                       "--configs", *(TRAIN_SMOKE if smoke else TRAIN_SD15)]]),
        Part("diffusers_full", 75, 240, [[*timed, str(out / "diffusers_full.json"), warmup,
                                          str(examples / "train_dreambooth.py"),
                                          *anchor_args(inputs, smoke, work / "diffusers_full"),
                                          "--learning_rate=5e-6"]]),
        Part("diffusers_lora", 60, 240, [[*timed, str(out / "diffusers_lora.json"), warmup,
                                          str(examples / "train_dreambooth_lora.py"),
                                          *anchor_args(inputs, smoke, work / "diffusers_lora"),
                                          "--learning_rate=1e-4", "--rank=4"]]),
        Part("class_images", 45, 120, [[py, str(BENCH / "bench_generate.py"), *smoke_flag,
                                        "--results", str(out / "generate.json")]
                                       + ([] if smoke else ["--precisions", "fp16", "--batch-sizes", "8", "16",
                                                            "--images", "32", "--steps", "25"])]),
        # SDXL (issue 13): its random folder is ~13 GB in fp32, written only for diffusers' script.
        Part("train_sdxl", 150, 300, [[py, str(BENCH / "bench_train.py"), *smoke_flag, "--results",
                                       str(out / "train_sdxl.json"), "--configs", *TRAIN_SDXL]
                                      + (["--warmup", "1", "--steps", "2"] if smoke else ["--warmup", "2", "--steps", "6"])]),
        Part("sdxl_inputs", 90, 120, [[py, str(BENCH / "gpu_check.py"), "--make-inputs", str(inputs_xl),
                                       "--family", "sdxl", *smoke_flag]]),
        Part("diffusers_sdxl_lora", 120, 240, [[*timed, str(out / "diffusers_sdxl_lora.json"), warmup,
                                                str(examples / "train_dreambooth_lora_sdxl.py"),
                                                *anchor_args(inputs_xl, smoke, work / "diffusers_sdxl_lora", 1024),
                                                "--learning_rate=1e-4", "--rank=4"]]),
        # Last: 200 class images + 800 steps take minutes before the levers; whatever budget is left.
        Part("e2e", 150, 300, [[py, str(BENCH / "bench_e2e.py"), *smoke_flag, "--config", E2E_CONFIG,
                                "--results", str(out / "e2e.json")] + ([] if smoke else ["--model-dir",
                                                                                         str(inputs / "model")])]),
        # Does CUDA's inductor zero the gradients below an upsampler as the CPU's did (benchmarks/README.md,
        # "Compiled step")? Five diffusers blocks, a few seconds of compiling each; the fast configs' compile_check
        # would also stop on it (recorded as failed: CompiledStepMismatch).
        Part("compile_bug", 60, 300, [[py, str(BENCH / "compile_check.py"), "--minimal", variant, "--out",
                                       str(out / "compile_bug.json")]
                                      for variant in ("nchw", "channels-last", "nchw-no-layout-opt")]),
        # Lowest priority: torchao compiles its step per parameter shape (minutes on the first run?).
        Part("optimizers", 120, 300, [[py, str(BENCH / "bench_train.py"), *smoke_flag, *train_args,
                                       "--results", str(out / "train_optimizers.json"), "--configs", *OPTIMIZERS]]),
        # FLUX.1 [dev] (issue 18), past the SD budget: a second call `--parts train_flux flux_inputs
        # diffusers_flux_lora`. Ours first (each QLoRA config writes and reads back a 24 GB transformer in /tmp and
        # deletes it), then the 33 GB bf16 folder diffusers' script reads (the machine's disk: 64 GiB).
        Part("train_flux", 240, 300, [[py, str(BENCH / "bench_train.py"), *smoke_flag, "--results",
                                       str(out / "train_flux.json"), "--configs", *TRAIN_FLUX]
                                      + (["--warmup", "1", "--steps", "2"] if smoke else ["--warmup", "2", "--steps", "6"])]),
        Part("flux_inputs", 150, 120, [[py, str(BENCH / "gpu_check.py"), "--make-inputs", str(inputs_flux),
                                        "--family", "flux", *smoke_flag]]),
        Part("diffusers_flux_lora", 180, 300, [[*timed, str(out / "diffusers_flux_lora.json"), "2" if not smoke else warmup,
                                                str(examples / "train_dreambooth_lora_flux.py"),
                                                *flux_anchor_args(inputs_flux, smoke, work / "diffusers_flux_lora")]]),
        # The 16 GB claim end to end (a later call: `--parts flux_inputs flux_16gb`): FLUX.1 QLoRA with prior
        # preservation through train() on flux_inputs' folder, the H200 capped to a 16 GB T4's 15 GiB: class images
        # (parts taking turns on the GPU), the prompt cache (T5 streamed), steps, a validation grid, the save. The
        # smoke run takes the bf16 LoRA config (the tiny model's 32-wide layers are too narrow for 4-bit on a CPU).
        Part("flux_16gb", 240, 120, [[py, str(BENCH / "bench_e2e.py"), *smoke_flag, "--config",
                                      "flux-lora16-bf16-cached-512" if smoke else "flux-qlora16-nf4-cached-1024",
                                      "--class-images", "2", "--class-steps", "4", "--train-steps", "4", "--validation",
                                      "--memory-cap-gib", "15", "--results", str(out / "e2e_flux_16gb.json")]
                                     + ([] if smoke else ["--model-dir", str(inputs_flux / "model")])]),
    ]


def make_inputs(folder: Path, smoke: bool, family: str) -> None:
    """A random pipeline folder (bench_e2e's), 5 "photos" and 4 class images (diffusers then generates none)."""
    sys.path.insert(0, str(BENCH))
    from bench_e2e import ensure_model, write_photos
    from common import image_side
    side = image_side(smoke, family)
    print(f"model folder: {ensure_model(folder / 'model', smoke, family):.1f} s")
    write_photos(folder / "photos", 5, side)
    write_photos(folder / "class", 4, side, seed=1)


def run_part(part: Part, limit: float, log) -> dict:
    """Run a part's commands in order within `limit` seconds; the record says how it ended."""
    started = time.perf_counter()
    status = "ok"
    for command in part.commands:
        left = limit - (time.perf_counter() - started)
        if left <= 0:
            status = f"timeout: out of its {limit:.0f} s box"
            break
        log(f"[{part.name}] {shlex.join(command)}  (box {left:.0f} s)")
        # Own process group: a timeout also ends the children (bench_train runs one process per config).
        proc = subprocess.Popen(command, start_new_session=True)

        def stop(signum, frame):  # this script stopped from outside (the device's limit): take the part along
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            code = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout: killed after its {limit:.0f} s box"
            break
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if code != 0:
            status = f"failed: exit code {code}"
            break
    return dict(part=part.name, status=status, seconds=time.perf_counter() - started, box_s=limit,
                commands=[shlex.join(c) for c in part.commands])


def load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def side_by_side(out: Path) -> list[dict]:
    """Each of our train records beside diffusers' script for the same job (full or LoRA), from this run."""
    anchors = {"full": load(out / "diffusers_full.json"), "lora": load(out / "diffusers_lora.json"),
               "sdxl-lora": load(out / "diffusers_sdxl_lora.json"), "sdxl-full": None,  # diffusers has no full SDXL script
               "flux-lora": load(out / "diffusers_flux_lora.json")}  # ours at 1024 px (its run); the 512 px rows too
    rows = []
    for r in [r for name in ("train", "train_sdxl", "train_optimizers", "train_flux")
              for r in load(out / f"{name}.json") or []]:
        if r.get("status") != "ok":
            rows.append(dict(ours=r["config"], status=r.get("status")))
            continue
        job = "lora" if "lora" in r["method"] else "full"  # qlora16-nf4 beside diffusers' bf16 LoRA (its QLoRA: none)
        family = next((f for f in ("sdxl", "flux") if r["config"].startswith(f + "-")), None)
        ref = anchors[f"{family}-{job}" if family else job]
        ratio = r["steps_per_s"] / ref["steps_per_s"] if ref and ref.get("steps_per_s") else None
        rows.append(dict(ours=r["config"], steps_per_s=r["steps_per_s"], peak_allocated_gb=r.get("peak_allocated_gb"),
                         mfu=r.get("mfu"), gpu_busy_share=r.get("gpu_busy_share"),
                         kernel_launches_per_step=r.get("kernel_launches_per_step"),
                         diffusers=ref and ref.get("script"), diffusers_steps_per_s=ref and ref.get("steps_per_s"),
                         diffusers_peak_allocated_gb=ref and ref.get("peak_allocated_gb"), speedup=ratio))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=False, help="folder for every JSON record ($OUT on the GPU machine)")
    p.add_argument("--smoke", action="store_true", help="CPU rehearsal on tiny models (diffusers via cpu-dry-run)")
    p.add_argument("--parts", nargs="+", help="run only these parts, in PARTS order (default: all)")
    p.add_argument("--budget", type=float, help="seconds for all parts together (default 450; smoke 1800)")
    p.add_argument("--anchors", type=Path, default=REPO / ".anchors", help="copy of ../shared/bench-anchors")
    p.add_argument("--work", type=Path, help="scratch folder for models and runs (default /tmp/gpu_check)")
    p.add_argument("--make-inputs", type=Path, help=argparse.SUPPRESS)  # internal: the "inputs" parts
    p.add_argument("--family", default="sd", help=argparse.SUPPRESS)  # with --make-inputs: "sd", "sdxl" or "flux"
    args = p.parse_args(argv)
    if args.make_inputs:
        make_inputs(args.make_inputs, args.smoke, args.family)
        return 0
    if args.out is None:
        p.error("--out is required")
    if not (args.anchors / "timed.py").is_file():
        p.error(f"no {args.anchors}/timed.py: copy ../shared/bench-anchors to .anchors/ (and carry it) or pass --anchors")
    budget = args.budget or (1800 if args.smoke else 450)
    work = args.work or Path("/tmp/gpu_check")
    args.out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    all_parts = parts(py, args.out, work, args.anchors.resolve(), args.smoke)
    names = [x.name for x in all_parts]
    unknown = sorted(set(args.parts or []) - set(names))
    if unknown:
        p.error(f"unknown parts {unknown}: choose from {names}")
    chosen = [x for x in all_parts if not args.parts or x.name in args.parts]
    for stale in ("train.json", "e2e.json", "generate.json", "diffusers_full.json", "diffusers_lora.json",
                  "train_sdxl.json", "diffusers_sdxl_lora.json", "train_flux.json", "diffusers_flux_lora.json"):
        (args.out / stale).unlink(missing_ok=True)  # one run's records only: ratios never mix two runs

    def log(msg):
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    started, records = time.perf_counter(), []
    for part in chosen:
        left = budget - (time.perf_counter() - started)
        box = part.smoke_timeout if args.smoke else part.timeout
        if left < 10:
            records.append(dict(part=part.name, status=f"skipped: {budget:.0f} s budget spent", seconds=0.0))
            continue
        records.append(run_part(part, min(box, left), log))
        log(f"[{part.name}] {records[-1]['status']} in {records[-1]['seconds']:.0f} s")
    summary = dict(kind="gpu_check", smoke=args.smoke, budget_s=budget, total_s=time.perf_counter() - started,
                   time_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command=shlex.join(["python", *sys.argv]), parts=records, side_by_side=side_by_side(args.out))
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    for row in summary["side_by_side"]:
        log(json.dumps(row))
    log(f"done in {summary['total_s']:.0f} s; records in {args.out}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
