"""Shared pieces of the benchmarks: the models (Stable Diffusion 1.5's or XL's architecture, or the tiny
one), the environment record, result files, the peak-TFLOP/s table behind MFU, the profiler summary
(operator / kernel counts per step) and markdown tables.

Weights are random: speed and memory do not depend on weight values, and nothing can be downloaded.

    python benchmarks/common.py benchmarks/results/train.json     # print a results file as a markdown table
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the scripts run as `python benchmarks/x.py`, without installing the library

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLFlux2,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,  # noqa: E402
                          Qwen3Config, Qwen3ForCausalLM, T5Config, T5EncoderModel)

from dreambooth_lib.tiny import (TINY_WORDS, build_tiny_components, build_tiny_flux2_components,  # noqa: E402
                                 build_tiny_flux_components, write_clip_tokenizer, write_qwen_tokenizer,
                                 write_t5_tokenizer)
from dreambooth_lib import families  # noqa: E402
from dreambooth_lib.families import Models  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"

# Dense (no 2:4 sparsity) tensor-core peak TFLOP/s from NVIDIA's data sheets, keyed by a substring of
# torch.cuda.get_device_name(); the first match wins, so specific names come first. None: no such units.
PEAK_TFLOPS = {
    "H100 PCIe": {"fp16": 756.0, "bf16": 756.0},
    "H100 NVL": {"fp16": 835.0, "bf16": 835.0},
    "H100": {"fp16": 989.4, "bf16": 989.4},  # SXM ("NVIDIA H100 80GB HBM3")
    "H200": {"fp16": 989.4, "bf16": 989.4},
    "A100": {"fp16": 312.0, "bf16": 312.0},
    "A10G": {"fp16": 70.0, "bf16": 70.0},  # AWS's A10G runs lower clocks than the A10 (125)
    "L4": {"fp16": 121.0, "bf16": 121.0},
    "T4": {"fp16": 65.0, "bf16": None},  # Turing has no bf16 tensor cores
}

# Stable Diffusion 1.5's published component configs (stable-diffusion-v1-5/*/config.json).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215,
)
SD15_TEXT = dict(  # CLIP ViT-L/14 text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
SD15_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# Stable Diffusion XL base 1.0's published component configs (stabilityai/stable-diffusion-xl-base-1.0/*/config.json):
# UNet 2,567,463,684 parameters, CLIP ViT-L text encoder 123,060,480 (SD1.5's text tower), OpenCLIP bigG text
# encoder with projection 694,659,840, VAE 83,653,863 (SD1.5's architecture, another scaling factor; fp16 overflows).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048,  # 768 (ViT-L) + 1280 (bigG) penultimate hidden states, concatenated
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled bigG 1280 + 6 micro-conditioning ids x 256
    norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT = dict(SD15_TEXT)  # CLIP ViT-L/14 text tower
SDXL_TEXT_2 = dict(  # OpenCLIP ViT-bigG/14 text tower + text projection
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)


def sd15_components(tokenizer: CLIPTokenizer) -> dict:
    """Random-weight SD1.5 UNet / VAE / CLIP text encoder, built on the current default device.

    The tokenizer only has to produce ids below 49408 in 77 positions: the tiny word-level one does.
    """
    return dict(unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD15_VAE),
                text_encoder=CLIPTextModel(_text_config(SD15_TEXT, tokenizer)),
                tokenizer=tokenizer,
                scheduler=PNDMScheduler(**SD15_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1))


def _text_config(values: dict, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(**values, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def sdxl_components(tokenizer: CLIPTokenizer) -> dict:
    """Random-weight SDXL base UNet / VAE / both text encoders, built on the current default device.
    Both encoders read the tiny word-level tokenizer's ids (77 positions: the encoders' full work)."""
    with torch.device("cpu"):  # the sampler keeps its sigmas on the CPU (whatever device the models are built on)
        scheduler = EulerDiscreteScheduler(**SD15_BETAS, steps_offset=1, timestep_spacing="leading")
    return dict(unet=UNet2DConditionModel(**SDXL_UNET), vae=AutoencoderKL(**SDXL_VAE),
                text_encoder=CLIPTextModel(_text_config(SDXL_TEXT, tokenizer)),
                text_encoder_2=CLIPTextModelWithProjection(_text_config(SDXL_TEXT_2, tokenizer)),
                tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler)


# FLUX.1 [dev]'s published component configs (black-forest-labs/FLUX.1-dev/{transformer,vae,text_encoder_2,
# scheduler}/config.json; text_encoder is CLIP ViT-L/14's text tower, SD1.5's): transformer 11,901,408,320
# parameters, T5-XXL encoder 4,762,310,656, CLIP 123,060,480, VAE 83,819,683 (counted on the meta device by a test).
FLUX1_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX1_VAE = dict(SD15_VAE, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
FLUX1_TEXT = dict(SD15_TEXT)
FLUX1_T5 = dict(  # google/t5-v1_1-xxl's encoder
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)
FLUX1_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096)

# FLUX.2 [klein] 4B (black-forest-labs/FLUX.2-klein-4B/transformer/config.json as several public loaders copy it:
# 5 double- and 20 single-stream blocks, 24 heads x 128 = 3072 wide, text 3 x 2560 = 7680 wide; the hub file
# itself was not readable here). Text encoder: Qwen3-4B's config (Qwen/Qwen3-4B/config.json, tied embeddings).
# VAE: AutoencoderKLFlux2's defaults in diffusers 0.42.1, taken to be FLUX.2's VAE (unsure: not checked against
# the hub's vae/config.json). Scheduler: as dreambooth_lib.tiny's klein (shift 3, dynamic; unsure of the hub
# file's other fields, which only shape sampling, not a training step).
KLEIN4B_TRANSFORMER = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                           num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
                           mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6,
                           guidance_embeds=False)
KLEIN4B_TEXT = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                    rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=True)
KLEIN4B_VAE = dict()  # AutoencoderKLFlux2() (see above)
KLEIN4B_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def flux_components(clip_tokenizer: CLIPTokenizer, t5_tokenizer) -> dict:
    """Random-weight FLUX.1 [dev] transformer / VAE / CLIP / T5-XXL, built on the current default device.
    The tiny word-level tokenizers give ids below both vocabularies; T5 is padded to max_sequence_length."""
    with torch.device("cpu"):  # the sampler keeps its sigmas on the CPU
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX1_SCHEDULER)
    t5 = T5Config(**FLUX1_T5, pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id)
    return dict(transformer=FluxTransformer2DModel(**FLUX1_TRANSFORMER), vae=AutoencoderKL(**FLUX1_VAE),
                text_encoder=CLIPTextModel(_text_config(FLUX1_TEXT, clip_tokenizer)), text_encoder_2=T5EncoderModel(t5),
                tokenizer=clip_tokenizer, tokenizer_2=t5_tokenizer, scheduler=scheduler)


def flux2_components(qwen_tokenizer) -> dict:
    """Random-weight FLUX.2 [klein] 4B transformer / VAE / Qwen3-4B, built on the current default device."""
    with torch.device("cpu"):
        scheduler = FlowMatchEulerDiscreteScheduler(**KLEIN4B_SCHEDULER)
    text = Qwen3Config(**KLEIN4B_TEXT, pad_token_id=qwen_tokenizer.pad_token_id, eos_token_id=qwen_tokenizer.eos_token_id)
    return dict(transformer=Flux2Transformer2DModel(**KLEIN4B_TRANSFORMER), vae=AutoencoderKLFlux2(**KLEIN4B_VAE),
                text_encoder=Qwen3ForCausalLM(text), tokenizer=qwen_tokenizer, scheduler=scheduler)


FAMILIES = ("sd", "sdxl", "flux", "flux2")


def build_components(smoke: bool, workdir: str | Path, device, seed: int = 0, family: str = "sd",
                     flux_width: int = 32) -> dict:
    """Pipeline components (denoiser, vae, text_encoder(s), tokenizer(s), scheduler) created directly on `device`:
    random init on the GPU takes milliseconds where SD1.5 on the CPU takes many seconds.
    family: "sd" (SD1.5), "sdxl" (SDXL base 1.0), "flux" (FLUX.1 [dev]) or "flux2" (FLUX.2 [klein] 4B).
    flux_width: the tiny FLUX models' width (64: with 16 latent channels, what bitsandbytes' CPU 4-bit kernels take)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}: one of {FAMILIES}")
    workdir = Path(workdir)
    tok_dir = workdir / "tokenizer"
    if family == "flux2":
        write_qwen_tokenizer(TINY_WORDS, tok_dir)
    else:
        tokenizer = write_clip_tokenizer(TINY_WORDS, tok_dir, model_max_length=16 if smoke else 77)
    if family == "flux":
        t5_tokenizer = write_t5_tokenizer(TINY_WORDS, workdir / "tokenizer_2")
    torch.manual_seed(seed)
    with torch.device(device):
        if smoke and family == "sd":
            return build_tiny_components(seed=seed, sample_size=16, tokenizer_dir=tok_dir)
        if smoke and family == "sdxl":
            from dreambooth_lib.tiny import build_tiny_sdxl_components
            return build_tiny_sdxl_components(seed=seed, sample_size=16, tokenizer_dir=tok_dir)
        if smoke and family == "flux":
            return build_tiny_flux_components(seed, tok_dir, workdir / "tokenizer_2", width=flux_width,
                                              latent_channels=16 if flux_width == 64 else 4)
        if smoke:
            return build_tiny_flux2_components(seed, tok_dir, latent_channels=16 if flux_width == 64 else 4,
                                               width=flux_width)
        if family == "flux":
            return flux_components(tokenizer, t5_tokenizer)
        if family == "flux2":
            from transformers import Qwen2Tokenizer
            return flux2_components(Qwen2Tokenizer.from_pretrained(tok_dir))
        return sd15_components(tokenizer) if family == "sd" else sdxl_components(tokenizer)


def family_of(parts: dict) -> str:
    if "transformer" in parts:
        return "flux" if "text_encoder_2" in parts else "flux2"
    return "sdxl" if "text_encoder_2" in parts else "sd"


def training_models(parts: dict) -> Models:
    """The library's Models bundle, frozen like models.load_models leaves them (the caller unfreezes)."""
    family = families.FAMILIES[family_of(parts)]
    for name in (family.DENOISER, "vae") + family.TEXT_ENCODERS:
        parts[name].requires_grad_(False)
    # The UNet families train with DDPM's noise schedule; the flow-matching ones with the sampler's own sigmas
    # (as their load_models returns it).
    noise_scheduler = (parts["scheduler"] if family.DENOISER == "transformer"
                       else DDPMScheduler.from_config(parts["scheduler"].config))
    return Models(family, parts[family.DENOISER], parts["vae"], noise_scheduler,
                  tuple(parts[name] for name in family.TEXT_ENCODERS), tuple(parts[name] for name in family.TOKENIZERS))


def pipeline(parts: dict) -> DiffusionPipeline:
    family = family_of(parts)
    if family == "flux":
        return FluxPipeline(**parts)
    if family == "flux2":
        return Flux2KleinPipeline(**parts)
    if family == "sdxl":
        return StableDiffusionXLPipeline(**parts, add_watermarker=False)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def image_side(smoke: bool, family: str = "sd") -> int:
    """Native side: tiny models 32 px (2x or 8x VAE); SD1.5 512, SDXL and FLUX 1024 (8x VAE)."""
    return 32 if smoke else {"sd": 512, "sdxl": 1024, "flux": 1024, "flux2": 1024}[family]


# --- measuring --------------------------------------------------------------------------------------

def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device) -> dict:
    """Peak allocated (tensors) and reserved (caching allocator, what nvidia-smi sees minus context) GB."""
    if torch.device(device).type != "cuda":
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}


def peak_tflops(device_name: str, dtype: str) -> float | None:
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(dtype)
    return None


def mfu(flops_per_step: float, steps_per_s: float, device_name: str, dtype: str) -> tuple[float | None, str]:
    """Model FLOP utilisation: achieved FLOP/s over the device's dense peak for `dtype`, with a note."""
    peak = peak_tflops(device_name, dtype)
    if peak is None:
        known = ", ".join(PEAK_TFLOPS)
        return None, f"no {dtype} peak TFLOP/s for device {device_name!r} (table knows: {known})"
    return flops_per_step * steps_per_s / (peak * 1e12), f"peak {peak:g} TFLOP/s dense {dtype}"


# --- profiling: where a step's time goes ------------------------------------------------------------

# Dispatcher operators (aten::mm, bitsandbytes::optimizer_update_8bit_blockwise, ...): what Python and autograd
# call; on a GPU almost every one that computes is at least one kernel launch. autograd:: / torch:: are nodes.
OPERATOR = re.compile(r"^(?!autograd::|torch::)[a-z_][a-z0-9_]*::")
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cudaGraphLaunch")  # + Ex/ExC
OPTIMIZER_STEP = "Optimizer.step#"  # torch.optim records each step() as "Optimizer.step#AdamW8bit.step"


def profile_steps(step, steps: int, device, top: int = 10) -> dict:
    """Run step(i) for i < steps under torch.profiler and summarise it (see profile_summary)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.device(device).type == "cuda"
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        started = time.perf_counter()
        for i in range(steps):
            step(i)
        synchronize(device)
        wall = time.perf_counter() - started
    return profile_summary(prof.events(), steps, wall, cuda, top)


def _inside(event, prefix: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time with at least one kernel running."""
    busy, end_so_far = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > end_so_far:
            busy += end - max(start, end_so_far)
            end_so_far = end
    return busy


def profile_summary(events, steps: int, wall_s: float, cuda: bool, top: int = 10) -> dict:
    """Per-step counts and top time sinks of profiled training steps.

    operator_calls_per_step: dispatcher operators at any depth (the CPU proxy of kernel launches, held by CI);
    optimizer_calls_per_step: operators the optimizer's step() calls directly (one per parameter tensor for
    a per-tensor optimizer, a few for a fused / foreach one); optimizer_operator_calls_per_step: all operators
    inside step(). With CUDA: kernel launches (host side, a CUDA-graph replay counts 1), device kernels, the
    GPU-busy share of the profiled wall time (union of kernel intervals; profiler overhead included) and the
    top kernels by device time; else those fields are None and top_cpu_ops (by self CPU time) stands in.
    """
    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and OPERATOR.match(e.name)]
    in_optimizer = [e for e in ops if _inside(e, OPTIMIZER_STEP)]
    direct = [e for e in in_optimizer if not (e.cpu_parent and OPERATOR.match(e.cpu_parent.name))]
    per = 1.0 / steps

    def top_by(items, key):
        total = Counter(), Counter()
        for e in items:
            total[0][e.name] += key(e)
            total[1][e.name] += 1
        return [dict(name=name[:120], ms_per_step=us * per / 1e3, calls_per_step=total[1][name] * per)
                for name, us in total[0].most_common(top)]

    record = dict(
        profile_steps=steps, profiled_wall_s=wall_s,
        operator_calls_per_step=len(ops) * per, optimizer_calls_per_step=len(direct) * per,
        optimizer_operator_calls_per_step=len(in_optimizer) * per,
        top_cpu_ops=top_by(ops, lambda e: e.self_cpu_time_total),
        kernel_launches_per_step=None, optimizer_kernel_launches_per_step=None, device_kernels_per_step=None,
        gpu_busy_share=None, top_kernels=None,
        profile_note="torch.profiler; operator counts are per step, after warm-up" + (
            "" if cuda else "; no CUDA device: kernel launches, GPU-busy share and top kernels are null"),
    )
    if cuda:
        launches = [e for e in events if e.name.startswith(KERNEL_LAUNCHES)]
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        span = [e.time_range for e in events if e.time_range.end > e.time_range.start]
        span_us = max(r.end for r in span) - min(r.start for r in span)
        record.update(
            kernel_launches_per_step=len(launches) * per,
            optimizer_kernel_launches_per_step=sum(_inside(e, OPTIMIZER_STEP) for e in launches) * per,
            device_kernels_per_step=len(kernels) * per,
            gpu_busy_share=_busy_us([(e.time_range.start, e.time_range.end) for e in kernels]) / span_us,
            top_kernels=top_by(kernels, lambda e: e.time_range.end - e.time_range.start),
        )
    return record


# --- records ----------------------------------------------------------------------------------------

def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device) -> dict:
    """Who measured what: device, driver, library versions, commit and the exact command."""
    cuda = torch.device(device).type == "cuda"
    return dict(
        time_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        device_type=torch.device(device).type,
        driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if cuda else None,
        cuda=torch.version.cuda, python=platform.python_version(), torch=torch.__version__,
        **{p: _version(p) for p in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes")},
        git_commit=_run(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        command=shlex.join(["python", *sys.argv]),
    )


def append_results(path: str | Path, records: list[dict]) -> Path:
    """Append records to a JSON list file (created if missing); the file is rewritten whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.is_file() else []
    if not isinstance(old, list):
        raise ValueError(f"{path} is not a JSON list of benchmark records: move it away or pass another --results")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(old + records, indent=1))
    tmp.replace(path)
    return path


def default_results(name: str, smoke: bool) -> Path:
    """GPU records go to benchmarks/results/ (committed); CPU smoke records to runs/bench/ (git-ignored: their
    numbers mean nothing, and `make bench` must not dirty the checkout)."""
    return REPO / "runs" / "bench" / f"{name}_smoke.json" if smoke else RESULTS_DIR / f"{name}.json"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def markdown_table(records: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in records]
    return "\n".join(lines)


TABLE_COLUMNS = {
    "train": ["config", "device", "steps_per_s", "images_per_s", "peak_allocated_gb", "peak_reserved_gb",
              "model_tflops_per_step", "mfu", "status"],
    "generate": ["precision", "batch_size", "images_per_s", "s_per_image", "peak_allocated_gb", "device", "status"],
    "e2e": ["config", "device", "class_images", "class_images_s", "train_steps", "train_s", "total_s", "status"],
}


def main(paths: list[str]) -> None:
    for p in paths:
        records = json.loads(Path(p).read_text())
        kind = next(k for k in TABLE_COLUMNS if Path(p).name.startswith(k))
        print(f"\n{p}\n\n{markdown_table(records, TABLE_COLUMNS[kind])}")


if __name__ == "__main__":
    main(sys.argv[1:])
