"""Shared pieces of the benchmarks: the models (Stable Diffusion 1.5's architecture or the tiny one),
the environment record, result files, the peak-TFLOP/s table behind MFU, and markdown tables.

Weights are random: speed and memory do not depend on weight values, and nothing can be downloaded.

    python benchmarks/common.py benchmarks/results/train.json     # print a results file as a markdown table
"""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the scripts run as `python benchmarks/x.py`, without installing the library

import torch  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from dreambooth_lib.tiny import TINY_WORDS, build_tiny_components, write_clip_tokenizer  # noqa: E402
from dreambooth_lib.train import Models  # noqa: E402

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


def sd15_components(tokenizer: CLIPTokenizer) -> dict:
    """Random-weight SD1.5 UNet / VAE / CLIP text encoder, built on the current default device.

    The tokenizer only has to produce ids below 49408 in 77 positions: the tiny word-level one does.
    """
    text = CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    return dict(unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(text),
                tokenizer=tokenizer,
                scheduler=PNDMScheduler(**SD15_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1))


def build_components(smoke: bool, workdir: str | Path, device, seed: int = 0) -> dict:
    """Pipeline components (unet, vae, text_encoder, tokenizer, scheduler) created directly on `device`:
    random init on the GPU takes milliseconds where SD1.5 on the CPU takes many seconds."""
    tok_dir = Path(workdir) / "tokenizer"
    tokenizer = write_clip_tokenizer(TINY_WORDS, tok_dir, model_max_length=16 if smoke else 77)
    torch.manual_seed(seed)
    with torch.device(device):
        if smoke:
            return build_tiny_components(seed=seed, sample_size=16, tokenizer_dir=tok_dir)
        return sd15_components(tokenizer)


def training_models(parts: dict) -> Models:
    """The library's Models bundle, frozen like train.load_models leaves them (the caller unfreezes)."""
    for name in ("unet", "vae", "text_encoder"):
        parts[name].requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    return Models(parts["text_encoder"], parts["vae"], parts["unet"], noise_scheduler)


def pipeline(parts: dict) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def image_side(smoke: bool) -> int:
    return 32 if smoke else 512  # the tiny VAE downsamples 2x (16x16 latents), SD's 8x (64x64)


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
    return RESULTS_DIR / f"{name}{'_smoke' if smoke else ''}.json"


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
