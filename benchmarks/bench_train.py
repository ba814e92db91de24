"""DreamBooth training speed and memory: steps/s, images/s, peak GPU memory and MFU per configuration.

    python benchmarks/bench_train.py                          # every config on the GPU (SD1.5 architecture, 512 px)
    python benchmarks/bench_train.py --configs full-fp16-cached lora4-fp16-cached --steps 30
    python benchmarks/bench_train.py --configs full-fp16-cached --profile      # + torch.profiler fields in the record
    python benchmarks/bench_train.py --smoke                  # tiny model on the CPU: same code path, for CI
    python benchmarks/bench_train.py --cpu --resolution 64 --profile 1 --configs lora4-fp16-cached   # SD1.5 op counts, no GPU
    python benchmarks/bench_train.py --list                   # config names

Design: models are built in-process with random weights (SD1.5's architecture, or `dreambooth_lib.tiny`
with --smoke), wrapped in the library's `families.Models` and set up by `train.prepare_training`; each timed
step is `step.train_step`, the body of `train.train`'s loop (so the numbers are the library's, with its
one host sync per step for the NaN check). "cached" = cache_latents; text embeddings are cached whenever
the text encoder is frozen, as in train(). `train(cfg)` itself is timed end to end by bench_e2e.py.
Batch: 1 instance + 1 class image (prior preservation), like train().

Each config runs in its own process: accelerate fixes the mixed precision once per process, and a fresh
process gives clean peak-memory counters.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import common
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from dreambooth_lib import memory, models, step, train
from dreambooth_lib.config import TrainConfig

# Method: what is trained and how (lr only matters for the optimizer's arithmetic, not its speed).
METHODS = {
    "full": dict(use_lora=False, learning_rate=5e-6),
    "full-te": dict(use_lora=False, train_text_encoder=True, learning_rate=2e-6),
    "lora4": dict(use_lora=True, lora_rank=4, learning_rate=1e-4),
    "lora16": dict(use_lora=True, lora_rank=16, learning_rate=1e-4),
    "lora4-te": dict(use_lora=True, lora_rank=4, train_text_encoder=True, learning_rate=1e-4),
    "lora16-te": dict(use_lora=True, lora_rank=16, train_text_encoder=True, learning_rate=1e-4),
}
# Every config: prior preservation, batch 1 instance + 1 class. Without a mode suffix: the library as it was
# before issue 11's levers (8-bit AdamW, gradient checkpointing, NCHW, eager), the baseline of the H200 table.
COMMON = dict(optimizer="adamw8bit", gradient_checkpointing=True, channels_last=False, with_prior_preservation=True,
              class_noun="dog", train_batch_size=1, prior_loss_weight=1.0, seed=0)
# Mode suffixes (issue 11): what replaces the baseline's speed settings.
MODES = {
    "compile": dict(compile="unet"),  # baseline + torch.compile of the UNet
    "auto": dict(optimizer="auto", gradient_checkpointing="auto", channels_last="auto"),  # the library's defaults
    # fast: the defaults + the whole step's forward and loss compiled, CUDA graphs (no per-kernel launch cost)
    "fast": dict(optimizer="auto", gradient_checkpointing="auto", channels_last="auto", compile="step",
                 compile_mode="reduce-overhead"),
    # low-memory: what "auto" picks where the fast plan does not fit (a 16 GB T4): checkpointing + 8-bit AdamW
    "lowmem": dict(optimizer="adamw8bit", gradient_checkpointing=True, channels_last="auto"),
    # the optimizers side by side, no checkpointing, eager ("auto" on a >= 24 GB GPU = fused torch AdamW):
    # bitsandbytes' 8-bit AdamW (one call per tensor) and torchao's (compiled per parameter shape on first use)
    "bnb8": dict(optimizer="adamw8bit", gradient_checkpointing=False, channels_last="auto"),
    "torchao8": dict(optimizer="adamw8bit-torchao", gradient_checkpointing=False, channels_last="auto"),
}
MODE_CONFIGS = [f"{m}-fp16-cached-{mode}" for mode in ("fast", "lowmem", "auto") for m in ("full", "lora4")] + \
    [f"full-fp16-cached-{mode}" for mode in ("bnb8", "torchao8")]
PRECISIONS = {"full": ("fp16", "bf16")}  # the rest: fp16 only
# SDXL base 1.0's architecture at 1024 px (issue 13): LoRA r4 and the full UNet (8-bit AdamW), fp16 and bf16, cached.
SDXL = "sdxl-"
SDXL_CONFIGS = [f"{SDXL}{m}-{p}-cached" for m in ("lora4", "full") for p in ("fp16", "bf16")]
# Flow-matching transformers (issue 18): FLUX.1 [dev] ("flux-") and FLUX.2 [klein] 4B ("klein4b-") at 512 and
# 1024 px, LoRA r16 on the family's default targets over the bf16 base, and QLoRA: the same LoRA over an NF4 base
# (quantize_base).
# 8-bit AdamW, gradient checkpointing, cached latents and text conditioning, prior preservation, T5 / Qwen3 at
# 512 tokens (max_sequence_length's default).
FLOW = {"flux-": "flux", "klein4b-": "flux2"}
FLOW_METHODS = {"lora16-bf16": dict(), "qlora16-nf4": dict(quantize_base="nf4")}
FLOW_CONFIGS = [f"{prefix}{method}-cached-{side}" for prefix in FLOW for method in FLOW_METHODS for side in (512, 1024)]
RECORDED_FAILURE = 3  # exit code of a child that wrote its failure into the results


def config_names(compile_modes: tuple[bool, ...] = (False, True)) -> list[str]:
    names = []
    for method in METHODS:
        for precision in PRECISIONS.get(method, ("fp16",)):
            for cached in ("cached", "uncached"):
                for compiled in compile_modes:
                    names.append(f"{method}-{precision}-{cached}{'-compile' if compiled else ''}")
    return names + MODE_CONFIGS + SDXL_CONFIGS + FLOW_CONFIGS


def parse_flow_name(name: str, smoke: bool, resolution: int | None) -> tuple[TrainConfig, str, bool, bool, str]:
    """'flux-qlora16-nf4-cached-1024' -> (TrainConfig, method, compile?, cache?, note); smoke: the tiny model at 32 px."""
    if name not in FLOW_CONFIGS:
        raise SystemExit(f"unknown config {name!r}: the flow-matching ones are {FLOW_CONFIGS}")
    prefix = next(p for p in FLOW if name.startswith(p))
    method, side = name.removeprefix(prefix).rsplit("-cached-", 1)
    settings = {**COMMON, **METHODS["lora16"], **FLOW_METHODS[method]}
    cfg = TrainConfig(**settings, mixed_precision="bf16", cache_latents=True, model_family=FLOW[prefix],
                      resolution=resolution or (common.image_side(True) if smoke else int(side)),
                      max_sequence_length=8 if smoke else 512, checkpointing_steps=0, validation_steps=0)
    return cfg, method, False, True, "smoke: the tiny model at 32 px, T5 / Qwen3 at 8 tokens" if smoke else ""


def parse_name(name: str, smoke: bool, resolution: int | None = None, cpu: bool | None = None
               ) -> tuple[TrainConfig, str, bool, bool, str]:
    """'lora4-te-fp16-cached-compile' -> (TrainConfig, method, compile?, cache?, note); an 'sdxl-' prefix
    selects SDXL's architecture (TrainConfig.model_family), a MODES suffix the speed settings. resolution:
    default the family's native side (SD1.5 512, SDXL 1024; smoke 32); cpu: default = smoke (fp16 configs
    then run in bf16, and compiled ones with the aot_eager backend: same graphs, no code generation)."""
    if name.startswith(tuple(FLOW)):
        return parse_flow_name(name, smoke, resolution)
    family = "sdxl" if name.startswith(SDXL) else "sd"
    if family == "sdxl" and name not in SDXL_CONFIGS:
        raise SystemExit(f"unknown config {name!r}: the SDXL ones are {SDXL_CONFIGS}")
    parts = name.removeprefix(SDXL).split("-")
    mode = parts[-1] if parts[-1] in MODES else None
    parts = parts[:-1] if mode else parts
    if len(parts) < 3 or parts[-1] not in ("cached", "uncached") or "-".join(parts[:-2]) not in METHODS \
            or parts[-2] not in ("fp16", "bf16"):
        raise SystemExit(f"unknown config {name!r}: use one of `python benchmarks/bench_train.py --list`")
    method, precision, cached = "-".join(parts[:-2]), parts[-2], parts[-1] == "cached"
    notes, on_cpu = [], smoke if cpu is None else cpu
    if on_cpu and precision == "fp16":  # accelerate runs fp16 on the CPU without autocast
        precision = "bf16"
        notes.append("on CPU: fp16 config run in bf16")
    settings = {**COMMON, **METHODS[method], **MODES.get(mode, {})}
    compiled = settings.get("compile", "off") != "off"
    if on_cpu and compiled:
        settings["compile_backend"] = "aot_eager"
        notes.append("on CPU: compiled with the aot_eager backend")
    cfg = TrainConfig(**settings, mixed_precision=precision, cache_latents=cached,
                      resolution=resolution or common.image_side(smoke, family),
                      checkpointing_steps=0, validation_steps=0, model_family=family)
    note = "; ".join(notes)
    return cfg, method, compiled, cached, note


def build_state(cfg: TrainConfig, smoke: bool, workdir: Path, n_images: int = 4) -> step.TrainingState:
    """Random-weight models and pixels through the library's own train.prepare_training (as train() does)."""
    accelerator = train.make_accelerator(cfg)
    qlora = cfg.quantize_base != "no"
    parts = common.build_components(smoke, workdir, accelerator.device, cfg.seed, family=cfg.model_family,
                                    flux_width=64 if qlora else 32)  # bitsandbytes' CPU 4-bit kernels: 64-blocks
    if qlora:
        parts["transformer"] = quantized_transformer(parts.pop("transformer"), cfg, Path(workdir), accelerator.device)
    # Random pixels stand in for photos and class images: the values do not change the work.
    gen = torch.Generator().manual_seed(cfg.seed)
    side = cfg.resolution
    inst = [torch.rand(3, side, side, generator=gen) * 2 - 1 for _ in range(n_images)]
    cls = [torch.rand(3, side, side, generator=gen) * 2 - 1 for _ in range(n_images)]
    return train.prepare_training(cfg, common.training_models(parts), accelerator, inst,
                                  ["a photo of sks dog"] * n_images, cls, "a photo of a dog")


def quantized_transformer(transformer, cfg: TrainConfig, workdir: Path, device):
    """The random transformer saved and read back quantized by bitsandbytes while it loads, with the arguments
    models.load_models gives the family's from_pretrained (QLoRA's own path). On the CPU (--smoke) diffusers'
    quantizer refuses to run ("No GPU found") although bitsandbytes 0.50.2 runs NF4 there; its check is lifted
    as tests/test_qlora.py does, nothing else."""
    from diffusers.quantizers.bitsandbytes import bnb_quantizer
    from dreambooth_lib import families
    folder = workdir / "transformer"
    transformer.to(models.torch_dtype(cfg.mixed_precision)).save_pretrained(folder)
    del transformer
    quantizer = bnb_quantizer.BnB4BitDiffusersQuantizer
    check = quantizer.validate_environment
    if torch.device(device).type != "cuda":
        quantizer.validate_environment = lambda self, *args, **kwargs: None
    try:
        return families.FAMILIES[cfg.model_family].DENOISER_CLASS.from_pretrained(
            folder, **families.quantized_load(cfg, torch.device(device), models.torch_dtype(cfg.mixed_precision)))
    finally:
        quantizer.validate_environment = check  # the library's own runs still get diffusers' refusal


# NF4 bytes per quantized weight: 4 bits + with double quantization an 8-bit scale per 64-value block and an fp32
# scale per 256 blocks (Dettmers et al. 2023); biases stay in the compute dtype. An estimate of what bitsandbytes
# stores (it also skips the few layers diffusers keeps unquantized, ignored here).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
PLAN_GB = (16, 24, 40, 80)


def plan_inputs(name: str, workdir: Path) -> tuple[float, int, dict[bool, float]]:
    """memory.plan_memory's inputs for a flow-matching config, from its sizes alone (meta device: no weights, no
    GPU): weight bytes (frozen weights in bf16, the transformer's Linear weights at NF4_BYTES under QLoRA, fp32
    LoRA adapters; the frozen text encoders not counted: they leave the GPU once their prompts are cached, as
    models.memory_plan counts), trainable parameters, and the family's activation estimate {checkpointing: bytes}
    for 1 + 1 images."""
    cfg, *_ = parse_name(name, smoke=False)
    bundle = common.training_models(common.build_components(False, workdir, "meta", family=cfg.model_family))
    models.add_lora(bundle.denoiser, bundle.text_encoders, cfg, bundle.family)
    trainable = sum(p.numel() for p in bundle.denoiser.parameters() if p.requires_grad)
    frozen = (bundle.denoiser, bundle.vae)
    weight_bytes = 2 * sum(t.numel() for m in frozen for t in (*m.parameters(), *m.buffers()) if not t.requires_grad)
    if cfg.quantize_base == "nf4":
        linear = [m.weight for n, m in bundle.denoiser.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
        weight_bytes -= sum(w.numel() for w in linear) * (2 - NF4_BYTES)
    acts = {c: bundle.family.activation_bytes(bundle.denoiser.config, 2, cfg.resolution, 2, c, 8, cfg.max_sequence_length)
            for c in (False, True)}
    return weight_bytes + 4 * trainable, trainable, acts


def plan_table(names: list[str], gbs=PLAN_GB) -> str:
    """Markdown: per config and free memory, what the plan picks ("auto" optimizer and checkpointing) and its
    estimated peak. Estimates, not measurements."""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            weight_bytes, trainable, acts = plan_inputs(name, Path(workdir))
            row = {"config": name, "weights GB": weight_bytes / memory.GB}
            for gb in gbs:
                plan = memory.plan_memory(gb * memory.GB, weight_bytes, trainable, acts, half_copy_bytes=2)
                fits = "NOTHING FITS" not in plan.reason
                row[f"{gb} GB"] = (f"{plan.estimated_peak_gb:.1f}, {plan.optimizer}"
                                   f"{' + ckpt' if plan.gradient_checkpointing else ''}{'' if fits else ': no fit'}")
            rows.append(row)
    return common.markdown_table(rows, ["config", "weights GB"] + [f"{gb} GB" for gb in gbs])


def count_flops(state: step.TrainingState) -> float:
    """FLOPs of one step as the model defines them: checkpointing is switched off while counting, so
    recomputed forwards are not counted (MFU, not hardware utilisation)."""
    cfg, unet, text_encoder = state.cfg, state.models.denoiser, state.models.text_encoders[0]
    checkpointing = state.memory_plan.gradient_checkpointing  # "auto" resolved
    if checkpointing:
        unet.disable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.activation_checkpointing_disable()
    counter = FlopCounterMode(display=False)
    # Not the optimizer step: FlopCounterMode counts matmuls and convolutions only (none there), and torchao's
    # AdamW8bit compiles its step, which torch.compile refuses under a dispatch mode such as the counter.
    state.optimizer.step = lambda *args, **kwargs: None
    try:
        with counter:
            # eager, even when timing a compiled unet or step
            step.train_step(dataclasses.replace(state, denoiser=state.trained[0], loss_fn=step.noised_loss), step=0)
    finally:
        del state.optimizer.step  # the instance attribute shadowed the method
    if checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.activation_checkpointing_enable()
    return float(counter.get_total_flops())


def run_config(name: str, smoke: bool, warmup: int, steps: int, count: bool = True, profile: int = 0,
               resolution: int | None = None, cpu: bool = False) -> dict:
    """Build, count FLOPs, warm up, time `steps` steps; then `profile` more steps under torch.profiler."""
    cfg, method, compiled, cached, note = parse_name(name, smoke, resolution, cpu or smoke)
    with tempfile.TemporaryDirectory() as workdir:
        state = build_state(cfg, smoke, Path(workdir))
    device = state.accelerator.device
    flops = count_flops(state) if count else None
    started = time.perf_counter()
    for s in tqdm(range(1, warmup + 1), desc=f"{name} warm-up", leave=False):
        step.train_step(state, s)
    common.synchronize(device)
    warmup_s = time.perf_counter() - started
    common.reset_memory(device)  # steady state only: the counting step above ran without checkpointing
    losses = []
    started = time.perf_counter()
    for s in tqdm(range(warmup + 1, warmup + steps + 1), desc=f"{name} timed", leave=False):
        losses.append(step.train_step(state, s)["loss"])
    common.synchronize(device)
    elapsed = time.perf_counter() - started
    steps_per_s = steps / elapsed
    peaks = common.peak_memory_gb(device)  # before profiling, whose steps are not part of the steady state
    first = warmup + steps + 1
    profiled = common.profile_steps(lambda i: step.train_step(state, first + i), profile, device) if profile else {}
    env = common.environment(device)
    value, mfu_note = common.mfu(flops, steps_per_s, env["device"], cfg.mixed_precision) if flops else (None, "not counted")
    trainable = sum(p.numel() for p in state.params)
    return dict(
        kind="train", status="ok", config=name, smoke=smoke, note=note,
        method=method, mixed_precision=cfg.mixed_precision, cached=cached, compiled=compiled, resolution=cfg.resolution,
        images_per_step=2 * cfg.train_batch_size, gradient_checkpointing=state.memory_plan.gradient_checkpointing,
        optimizer=models.optimizer_name(state.optimizer), trainable_parameters=trainable,
        channels_last=memory.use_channels_last(cfg.channels_last, device), compile=cfg.compile,
        compile_mode=cfg.compile_mode, compile_backend=cfg.compile_backend, memory_plan=state.memory_plan.reason,
        warmup_steps=warmup, warmup_s=warmup_s, timed_steps=steps, timed_s=elapsed, steps_per_s=steps_per_s,
        images_per_s=steps_per_s * 2 * cfg.train_batch_size, losses_finite=all(map(math.isfinite, losses)),
        model_tflops_per_step=flops / 1e12 if flops else None, mfu=value, mfu_note=mfu_note,
        **peaks, **profiled, **env,
    )


def run_one_and_record(name: str, args) -> bool:
    """Child process: one config; a failure (OOM, compile error) becomes a record, not a lost run."""
    try:
        record = run_config(name, args.smoke, args.warmup, args.steps, count=not args.no_flops, profile=args.profile,
                            resolution=args.resolution, cpu=args.cpu)
    except Exception as err:  # noqa: BLE001 - every failure is a result to report
        traceback.print_exc()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        record = dict(kind="train", status=f"failed: {type(err).__name__}: {str(err)[:300]}", config=name,
                      smoke=args.smoke, **common.peak_memory_gb(device), **common.environment(device))
    common.append_results(args.results, [record])
    shown = {k: record.get(k) for k in ("config", "status", "steps_per_s", "peak_allocated_gb", "mfu")}
    print(shown, flush=True)
    return record["status"] == "ok"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU-sized: exercises the code path (CI)")
    p.add_argument("--configs", nargs="+", help="config names (default: all; --smoke default: two small ones)")
    p.add_argument("--compile", choices=("off", "on", "both"), default="both",
                   help="with the default config list: which torch.compile variants to include")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5; smoke 1)")
    p.add_argument("--steps", type=int, help="timed steps (default 20; smoke 2)")
    p.add_argument("--results", type=Path, help="JSON list to append to (default benchmarks/results/train[_smoke].json)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting step (no MFU)")
    p.add_argument("--profile", type=int, nargs="?", const=3, default=0, metavar="STEPS",
                   help="after timing, profile STEPS more steps (default 3) with torch.profiler: operator calls, "
                        "optimizer calls, kernel launches per step, GPU-busy share, top kernels / CPU ops")
    p.add_argument("--resolution", type=int, help="training side in pixels (default 512; smoke 32)")
    p.add_argument("--cpu", action="store_true",
                   help="run the full-size architecture on the CPU (operator counts at a small --resolution)")
    p.add_argument("--list", action="store_true", help="print the config names and exit")
    p.add_argument("--plan", action="store_true", help="print the memory plan's estimates (not measurements) of the "
                   f"flow-matching configs on {', '.join(map(str, PLAN_GB))} GB devices (meta device, no GPU) and exit")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config in this process
    args = p.parse_args(argv)
    if args.cpu:  # before anything touches CUDA (torch initialises it lazily); children inherit it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    if args.list:
        print("\n".join(config_names(modes)))
        return 0
    if args.plan:
        print(plan_table(args.configs or FLOW_CONFIGS))
        return 0
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 20)
    args.results = args.results or common.default_results("train", args.smoke)
    if args.warmup < 0 or args.steps < 1 or args.profile < 0:
        p.error(f"--warmup {args.warmup} and --profile {args.profile} must be >= 0 and --steps {args.steps} >= 1")
    if args.one:
        return 0 if run_one_and_record(args.one, args) else RECORDED_FAILURE
    if not (args.smoke or args.cpu) and not torch.cuda.is_available():
        p.error("no CUDA device: the SD1.5-size benchmark needs a GPU; use --smoke for the CPU code-path check "
                "or --cpu --resolution 64 for operator counts")
    names = args.configs or (["full-fp16-cached", "lora4-te-fp16-uncached"] if args.smoke else config_names(modes))
    for name in names:
        parse_name(name, args.smoke)  # every name checked before the first (slow) run
    base = [sys.executable, str(Path(__file__).resolve()), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--results", str(args.results), "--profile", str(args.profile)] + (["--smoke"] if args.smoke else []) \
        + (["--no-flops"] if args.no_flops else []) + (["--cpu"] if args.cpu else []) \
        + (["--resolution", str(args.resolution)] if args.resolution else [])
    failed = 0
    for name in names:
        done = subprocess.run(base + ["--one", name])
        failed += done.returncode != 0
        if done.returncode not in (0, RECORDED_FAILURE):  # killed (e.g. host OOM): still leave a trace
            device = "cuda" if torch.cuda.is_available() else "cpu"
            common.append_results(args.results, [dict(kind="train", status=f"failed: exit code {done.returncode}",
                                                      config=name, smoke=args.smoke, **common.environment(device))])
        gc.collect()
    print(f"results appended to {args.results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
