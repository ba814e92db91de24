"""Pretrain the toy world's base model: a Stable-Diffusion-architecture latent diffusion model.

Three stages, each reproducible from `seed`:
  1. AutoencoderKL on rendered 32 px pictures (32 px -> 8x8x4 latents), MSE + a tiny KL term.
  2. A fixed pretraining set is rendered once and encoded to latents once (the latent mean).
  3. UNet2DConditionModel + CLIPTextModel trained jointly from scratch with the DDPM epsilon
     objective (Ho et al. 2020, Alg. 1), captions dropped 10% of the time so classifier-free
     guidance works, with an EMA of the weights (the EMA is what is saved).
The result is a diffusers StableDiffusionPipeline folder (default `data/toy_model`), loaded with
`StableDiffusionPipeline.from_pretrained`, exactly as users load Stable Diffusion.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from matplotlib.figure import Figure
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dreambooth_lib.config import TOY_MODEL_DIR
from dreambooth_lib.fsio import publish
from dreambooth_lib.toyworld import render
from dreambooth_lib.toyworld.tokenizer import build_tokenizer

# SD's noise schedule (scaled_linear, 1000 steps), so every scheduler setting users know applies.
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# The subjects whose photos the VAE saw in pretraining (data/toy_model's VAE): fixed, so that adding
# subjects to render.SUBJECTS leaves pretraining reproducible. Later subjects' markings must survive a
# round trip through a VAE that never saw them (the oracle's VAE-round-trip accuracy checks it).
VAE_SUBJECTS = ("marked_star", "cross_cube")


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(32, 64, 64), sample_size=render.SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=render.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128), norm_num_groups=32, cross_attention_dim=128, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def build_text_encoder(tokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_attention_heads=4,
        num_hidden_layers=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the range SD's VAE works in."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(steps: int, batch_size: int, seed: int, log=print,
              num_images: int = 20000) -> tuple[AutoencoderKL, list[float]]:
    """Stage 1: the autoencoder, on freshly rendered pictures (any class/context/style, subjects too:
    the VAE is a generic image codec; subject markings must survive its round trip). num_images: the
    rendered pool (fewer only in the tests, where rendering 20,000 would take most of the time)."""
    torch.manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    pixels, _ = render.render_dataset(num_images, seed=seed + 1)
    subjects = [render.render(s, seed=seed + 10 * i + k) for k, name in enumerate(VAE_SUBJECTS)
                for i, s in enumerate(render.subject_specs(name, seed=seed + 7) * 40)]
    pixels = np.concatenate([pixels, np.stack([np.asarray(im) for im in subjects])])
    data = to_tensor(pixels)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in tqdm(range(steps), desc="vae", mininterval=10):
        x = data[torch.randint(0, len(data), (batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 500 == 0:
            log(f"vae step {step} loss {loss.item():.4f}")
    return vae.eval(), losses


@torch.no_grad()
def sharpen_posterior(vae: AutoencoderKL, logvar: float = -20.0) -> None:
    """Set the posterior's log-variance to a constant floor, leaving its mean (and the decoder) as is.

    The UNet is trained on posterior means, while DreamBooth (like diffusers' scripts) encodes with
    one posterior *sample*; our tiny KL weight left std ~0.1 of the latent spread, so those samples
    would be off the distribution the UNet learned. With this, sample == mean to ~1e-4, as with SD's
    VAE (posterior std ~1e-3 of the latent scale).
    """
    channels = vae.config.latent_channels
    vae.quant_conv.weight[channels:] = 0.0  # quant_conv outputs [mean; logvar]
    vae.quant_conv.bias[channels:] = logvar


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Latent means of the pretraining set (the posterior is narrow; the mean keeps data fixed)."""
    out = [vae.encode(to_tensor(pixels[i:i + batch_size])).latent_dist.mode() for i in range(0, len(pixels), batch_size)]
    return torch.cat(out)


def save_pipeline(folder: Path, vae, unet, text_encoder, tokenizer) -> None:
    """Write the diffusers pipeline folder atomically (temp folder, then rename)."""
    scheduler = DPMSolverMultistepScheduler(**BETAS, prediction_type="epsilon", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # vocab.json + merges.txt besides tokenizer.json: the files CLIP's tokenizer has always shipped, so
    # the slow CLIPTokenizer (and older transformers) load the model too
    tokenizer.backend_tokenizer.model.save(str(tmp / "tokenizer"))
    replace_folder(tmp, folder)


def replace_folder(tmp: Path, folder: Path) -> None:
    """Put the written `tmp` folder in place of `folder` (kept as folder.old until tmp is published: a kill
    in between leaves one of the two whole)."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    publish(tmp, folder)  # follows the umask (safetensors writes 0600 files), fsyncs, renames
    shutil.rmtree(old, ignore_errors=True)


def plot_losses(history: dict, path: Path, earlier_cycles: list[dict] = (),
                title: str = "UNet + text encoder (eps MSE)") -> None:
    """Loss curves; a continued model's earlier cycles (their 50-step means) come first on the UNet
    panel, and its VAE (trained in cycle 1, kept since) gets no panel, only its final loss."""
    vae, unet = np.asarray(history["vae"]), np.asarray(history["unet"])
    fig = Figure(figsize=(10, 3.5) if len(vae) else (6, 3.5))
    axes = fig.subplots(1, 2) if len(vae) else [fig.subplots()]
    def smoothed(y, offset=0):  # running mean over ~1/200 of the curve, centred
        k = max(1, len(y) // 200)
        return offset + np.arange(len(y) - k + 1) + k // 2, np.convolve(y, np.ones(k) / k, mode="valid")

    if len(vae):
        axes[0].plot(*smoothed(vae))
        axes[0].set_title("AutoencoderKL (MSE + KL)")
    offset = 0
    for n, cycle in enumerate(earlier_cycles, 1):
        y = np.asarray(cycle.get("unet_loss", cycle.get("loss")))  # the flow model logs "loss"
        if offset:
            axes[-1].axvline(offset, color="grey", lw=0.8)
        axes[-1].plot(offset + 50 * np.arange(len(y)) + 25, y, label=f"cycle {n}: peak lr {cycle['lr']:g}")
        offset += cycle["steps_done"]
    if len(unet):
        if offset:
            axes[-1].axvline(offset, color="grey", lw=0.8)
        axes[-1].plot(*smoothed(unet, offset), label=f"cycle {len(earlier_cycles) + 1}" if earlier_cycles else None)
    if earlier_cycles:
        axes[-1].legend()
        if not len(vae) and earlier_cycles[0].get("final_vae_loss"):
            title += f"; VAE from cycle 1 (final loss {earlier_cycles[0]['final_vae_loss']:.4f})"
    axes[-1].set_title(title, fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def optimize(params: list, steps: int, lr: float, batch_loss, save, started: float, log=print, desc: str = "unet",
             minutes: float | None = None, save_every_minutes: float = 10.0, warmup: int = 300) -> tuple[int, list[float]]:
    """The pretraining loop both toy base models share: AdamW (weight decay 1e-2), `warmup` steps of linear
    warm-up then cosine decay to `steps`, gradients clipped to norm 1, an EMA (0.999) of the weights.
    batch_loss(step) -> the step's loss; save(steps_done, losses) writes the model, called with the EMA
    weights in place every save_every_minutes and at the end. Returns (steps done, per-step losses)."""
    ema = EMAModel(params, decay=0.999)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses: list[float] = []

    def checkpoint(steps_done: int):
        ema.store(params)
        ema.copy_to(params)  # save the EMA weights, then put the training weights back
        save(steps_done, losses)
        ema.restore(params)

    last_save, step = time.time(), 0
    bar = tqdm(range(steps), desc=desc, mininterval=10)
    for step in bar:
        loss = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(loss.item())
        if step % 200 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
            log(f"{desc} step {step} loss {np.mean(losses[-200:]):.4f} ({time.time() - started:.0f}s)")
        if time.time() - last_save > save_every_minutes * 60:
            checkpoint(step)
            last_save = time.time()
        if minutes is not None and time.time() - started > minutes * 60:
            log(f"time budget of {minutes} min reached at step {step}")
            break
    checkpoint(step + 1)
    return step + 1, losses


def pretrain(out: str | Path = TOY_MODEL_DIR, seed: int = 0, num_images: int = 40000, vae_steps: int = 1500,
             steps: int = 7000, batch_size: int = 64, lr: float = 3e-4, minutes: float | None = None,
             save_every_minutes: float = 10.0, caption_dropout: float = 0.1, images_dir: str | Path = "images",
             init: str | Path | None = None, vae_images: int = 20000, log=print) -> dict:
    """Run all three stages; writes the pipeline to `out` (checkpointed every few minutes).

    `init`: a pipeline folder written by this function to continue from. Its tokenizer, VAE (and latent
    scaling) are kept, stage 1 is skipped, and the UNet + text encoder train `steps` more steps on a
    fresh warm-up + cosine schedule (a second cycle; the data set is re-rendered from `seed`).
    """
    started = time.time()
    out, images_dir = Path(out), Path(images_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    earlier_cycles: list[dict] = []
    if init is not None:
        init = Path(init)
        tokenizer = CLIPTokenizer.from_pretrained(init / "tokenizer")
        vae, vae_losses = AutoencoderKL.from_pretrained(init / "vae").eval(), []
        unet = UNet2DConditionModel.from_pretrained(init / "unet")
        text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder")
        log(f"continuing from {init}: its tokenizer and VAE are kept")
        init_log = init / "pretrain_log.json"
        if init_log.exists():  # keep the whole history (loss curve, wall time) in the continued model's log
            previous = json.loads(init_log.read_text())
            earlier_cycles = previous.pop("earlier_cycles", []) + [previous]
    else:
        tokenizer = build_tokenizer(out.with_name(out.name + ".tokenizer"), seed=seed)
        # half batch: the VAE step is the costlier one
        vae, vae_losses = train_vae(vae_steps, batch_size // 2, seed, log, num_images=vae_images)
        sharpen_posterior(vae)
        log(f"vae done in {time.time() - started:.0f}s, final loss {np.mean(vae_losses[-50:]):.4f}")
        unet, text_encoder = build_unet(), build_text_encoder(tokenizer)

    pixels, specs = render.render_dataset(num_images, seed=seed + 2)
    captions = [render.caption(s) for s in specs]
    latents = encode_latents(vae, pixels)
    if init is not None:
        scaling = vae.config.scaling_factor  # the UNet being continued was trained at this scale
    else:
        scaling = 1.0 / latents.std().item()  # SD's scaling_factor: unit-variance latents for the UNet
        vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    caption_ids, empty_ids = ids[:-1], ids[-1:]
    log(f"{num_images} pictures encoded, latent scaling factor {scaling:.4f}")

    params = list(unet.parameters()) + list(text_encoder.parameters())
    noise_scheduler = DDPMScheduler(**BETAS, prediction_type="epsilon")
    gen = torch.Generator().manual_seed(seed + 3)

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, num_images, (batch_size,), generator=gen)
        x0 = latents[idx]
        drop = torch.rand(batch_size, generator=gen) < caption_dropout
        input_ids = torch.where(drop[:, None], empty_ids, caption_ids[idx])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        x_t = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(x_t, t, text_encoder(input_ids)[0]).sample
        return F.mse_loss(pred, noise)  # || eps - eps_theta(x_t, t, c) ||^2

    def save(steps_done: int, losses: list[float]) -> None:
        save_pipeline(out, vae, unet, text_encoder, tokenizer)
        (out / "pretrain_log.json").write_text(json.dumps(dict(
            seed=seed, init=str(init) if init else None, steps_done=steps_done, steps_planned=steps, batch_size=batch_size, lr=lr, num_images=num_images,
            vae_steps=vae_steps, caption_dropout=caption_dropout, wall_time_s=time.time() - started,
            final_vae_loss=float(np.mean(vae_losses[-50:])) if vae_losses else None,
            final_unet_loss=float(np.mean(losses[-200:])) if losses else None,
            unet_loss=[float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)],
            earlier_cycles=earlier_cycles,
        ), indent=1))
        plot_losses({"vae": vae_losses, "unet": losses}, images_dir / "toy_pretrain_loss.png", earlier_cycles)

    step, _ = optimize(params, steps, lr, batch_loss, save, started, log, "unet", minutes, save_every_minutes)
    shutil.rmtree(out.with_name(out.name + ".tokenizer"), ignore_errors=True)
    log(f"pretraining done: {step} steps in {time.time() - started:.0f}s; model in {out}")
    return json.loads((out / "pretrain_log.json").read_text())
