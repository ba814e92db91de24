"""Pretrain the toy world's flow model: a FLUX.2 [klein]-architecture flow-matching transformer (issue 18).

    python -m dreambooth_lib.toyworld pretrain-flow        # writes data/toy_flow_model

Why [klein] of the two flow-matching families: its base model samples with classifier-free guidance (as
the toy SD model does, learnt from captions dropped 10 % of the time), and it has one text encoder.
Three stages, reproducible from `seed`:
  1. The VAE is the toy SD model's autoencoder (data/toy_model/vae), its weights moved into an
     AutoencoderKLFlux2 (the same encoder and decoder modules). FLUX.2 normalises the 2x2-patchified latents
     with the VAE's batch-norm statistics: they are set to the pretraining set's. The codec is the one the
     oracle was checked through (the subjects' markings survive its round trip).
  2. A fixed pretraining set is rendered once and encoded once, by the family's own encode_latents.
  3. Flux2Transformer2DModel + Qwen3 (28 narrow layers: the pipeline stacks hidden states 9, 18 and 27) from
     scratch with the rectified-flow objective x_s = (1 - s) x + s eps, target eps - x, s ~ U(0, 1), captions
     dropped 10 % of the time, an EMA of the weights saved. The prompts go through the family's
     encode_prompts and the transformer through its predict: pretraining, DreamBooth and the stock
     Flux2KleinPipeline share the text path, the packing and the ids.
The result loads with `Flux2KleinPipeline.from_pretrained`. Its tokenizer declares the 32-token text length
the model was trained at (model_max_length); the library pads prompts to it when training and sampling.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                       Flux2Transformer2DModel)
from transformers import Qwen3Config, Qwen3ForCausalLM

from dreambooth_lib.config import TOY_FLOW_MODEL_DIR, TOY_MODEL_DIR, repo_relative
from dreambooth_lib.families import flux2
from dreambooth_lib.loss import flow_matching_pair
from dreambooth_lib.tiny import write_qwen_tokenizer
from dreambooth_lib.toyworld import render
from dreambooth_lib.toyworld.pretrain import optimize, plot_losses, replace_folder, to_tensor
from dreambooth_lib.toyworld.tokenizer import caption_words, rare_tokens

TEXT_LENGTH = 32  # tokens of a templated prompt: the longest caption is 26 in [klein]'s chat template
TEXT_WIDTH = 32  # Qwen3's width; the transformer reads 3 of its layers stacked: 96 wide


def build_tokenizer(folder: Path, seed: int = 0):
    """[klein]'s tokenizer kind (Qwen2Tokenizer, byte-level BPE, chat template) over the caption words, frequent
    first, and rare never-seen tokens at the high-id end for the identifier picker (as the toy CLIP tokenizer)."""
    words = caption_words()
    return write_qwen_tokenizer(words + rare_tokens(set(words), seed=seed), folder, model_max_length=TEXT_LENGTH)


def build_text_encoder(tokenizer, seed: int = 0) -> Qwen3ForCausalLM:
    """Word embeddings drawn N(0, 1) (nn.Embedding's own init) rather than the LM's N(0, 0.02): the stacked
    layers 9, 18 and 27 are residual streams, and a word's identity must outweigh what the layers add to reach
    them. With 0.02 (cycle 1 of the first model) the class words stayed nearly indistinct there (star vs cube
    0.6 at the word's position, red vs blue 2.0) and the transformer learnt colour and context but not shape."""
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=TEXT_LENGTH,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():
        qwen.get_input_embeddings().weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    return qwen


def build_transformer(latent_channels: int = 4) -> Flux2Transformer2DModel:
    """128 wide (4 heads of 32), 2 double- and 4 single-stream blocks, no guidance embedding ([klein])."""
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=3 * TEXT_WIDTH, timestep_guidance_channels=64,
        axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False)


def flux2_vae_from(sd_vae_folder: str | Path) -> AutoencoderKLFlux2:
    """The toy SD autoencoder's weights in an AutoencoderKLFlux2 of the same shape (only `bn` is new)."""
    source = AutoencoderKL.from_pretrained(sd_vae_folder)
    c = source.config
    vae = AutoencoderKLFlux2(in_channels=c.in_channels, out_channels=c.out_channels, down_block_types=c.down_block_types,
                             up_block_types=c.up_block_types, block_out_channels=c.block_out_channels,
                             layers_per_block=c.layers_per_block, latent_channels=c.latent_channels,
                             norm_num_groups=c.norm_num_groups, sample_size=c.sample_size)
    missing, unexpected = vae.load_state_dict(source.state_dict(), strict=False)
    if unexpected or any(not k.startswith("bn.") for k in missing):
        raise RuntimeError(f"the SD VAE does not map onto AutoencoderKLFlux2: missing {missing}, unexpected {unexpected}")
    return vae.eval()


@torch.no_grad()
def set_latent_statistics(vae: AutoencoderKLFlux2, pixels: np.ndarray, batch_size: int = 512) -> None:
    """bn's running mean / variance := those of the patchified latent modes of `pixels`, per channel."""
    z = torch.cat([Flux2KleinPipeline._patchify_latents(vae.encode(to_tensor(pixels[i:i + batch_size])).latent_dist.mode())
                   for i in range(0, len(pixels), batch_size)])
    vae.bn.running_mean.copy_(z.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(z.var(dim=(0, 2, 3)))
    vae.bn.num_batches_tracked.fill_(1)


@torch.no_grad()
def encode_latents(vae: AutoencoderKLFlux2, pixels: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([flux2.encode_latents(vae, to_tensor(pixels[i:i + batch_size]), None)
                      for i in range(0, len(pixels), batch_size)])


def save_pipeline(folder: Path, transformer, vae, text_encoder, tokenizer, tokenizer_dir: Path | None = None) -> None:
    """The Flux2KleinPipeline folder, written whole to a temporary folder and renamed into place.

    A continued cycle's files differ from its init's only where the weights do: the tokenizer is copied from
    `tokenizer_dir` (saved again, it gains the loader's defaults) and no config keeps the `_name_or_path` it
    was loaded from (a local path)."""
    # Plain linear sigmas (no shift): the pipeline's size-dependent shift (mu) is calibrated on 1024 px
    # pictures; at 16 latent tokens it would leave a last Euler step from sigma 0.2 to 0.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = Flux2KleinPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, is_distilled=False)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for config in tmp.glob("*/config.json"):
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
        shutil.rmtree(tmp / "tokenizer")
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    replace_folder(tmp, folder)


def pretrain_flow(out: str | Path = TOY_FLOW_MODEL_DIR, seed: int = 0, num_images: int = 20000, steps: int = 3000,
                  batch_size: int = 64, lr: float = 1e-3, minutes: float | None = None, save_every_minutes: float = 10.0,
                  caption_dropout: float = 0.1, images_dir: str | Path = "images", sd_model: str | Path = TOY_MODEL_DIR,
                  init: str | Path | None = None, log=print) -> dict:
    """All three stages; writes the pipeline to `out` (also every save_every_minutes).

    `init`: a pipeline folder written by this function to continue from: its tokenizer, VAE (with its latent
    statistics), transformer and text encoder are kept, and they train `steps` more on a fresh warm-up + cosine
    schedule (a second cycle; the pretraining set is rendered anew from `seed`)."""
    started = time.time()
    out, images_dir = Path(out), Path(images_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    earlier_cycles: list[dict] = []
    if init is not None:
        parts = Flux2KleinPipeline.from_pretrained(init)
        tokenizer, vae = parts.tokenizer, parts.vae.eval()
        transformer, text_encoder = parts.transformer.train(), parts.text_encoder.train()
        previous = json.loads((Path(init) / "pretrain_log.json").read_text())
        earlier_cycles = previous.pop("earlier_cycles", []) + [previous]
        log(f"continuing from {init}: its tokenizer, VAE, transformer and text encoder")
    else:
        tokenizer = build_tokenizer(out.with_name(out.name + ".tokenizer"), seed=seed)
        vae = flux2_vae_from(Path(sd_model) / "vae")
    pixels, specs = render.render_dataset(num_images, seed=seed + 2)
    if init is None:
        set_latent_statistics(vae, pixels)
        transformer = build_transformer(vae.config.latent_channels)
        text_encoder = build_text_encoder(tokenizer, seed)
    latents = encode_latents(vae, pixels)
    captions = [render.caption(s) for s in specs]
    log(f"{num_images} pictures encoded to {tuple(latents.shape[1:])} latents ({time.time() - started:.0f}s)")

    params = list(transformer.parameters()) + list(text_encoder.parameters())
    log(f"transformer {sum(p.numel() for p in transformer.parameters()):,} + text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()):,} parameters")
    text_cfg = SimpleNamespace(max_sequence_length=TEXT_LENGTH)
    gen = torch.Generator().manual_seed(seed + 3)

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, num_images, (batch_size,), generator=gen)
        x0 = latents[idx]
        drop = (torch.rand(batch_size, generator=gen) < caption_dropout).tolist()
        prompts = ["" if d else captions[i] for d, i in zip(drop, idx.tolist())]  # "": the pipeline's negative prompt
        noise = torch.randn(x0.shape, generator=gen)
        sigmas = torch.rand(batch_size, generator=gen)
        x_s, target = flow_matching_pair(x0, noise, sigmas)  # x_s = (1 - s) x + s eps, target eps - x
        cond = flux2.encode_prompts((tokenizer,), (text_encoder,), prompts, text_cfg)
        return F.mse_loss(flux2.predict(transformer, x_s, sigmas, cond), target)  # || (eps - x) - v_theta(x_s, s, c) ||^2

    def save(steps_done: int, losses: list[float]) -> None:
        save_pipeline(out, transformer, vae, text_encoder, tokenizer, Path(init) / "tokenizer" if init else None)
        (out / "pretrain_log.json").write_text(json.dumps(dict(
            architecture="FLUX.2 [klein] (Flux2KleinPipeline, is_distilled=False)", seed=seed, init=str(init) if init else None,
            steps_done=steps_done,
            steps_planned=steps, batch_size=batch_size, lr=lr, num_images=num_images, caption_dropout=caption_dropout,
            text_length=TEXT_LENGTH, vae=f"{repo_relative(sd_model)}/vae (weights moved into AutoencoderKLFlux2)",
            wall_time_s=time.time() - started,
            final_loss=float(np.mean(losses[-200:])) if losses else None,
            loss=[float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)],
            earlier_cycles=earlier_cycles,
        ), indent=1))
        plot_losses({"vae": [], "unet": losses}, images_dir / "toy_flow_pretrain_loss.png", earlier_cycles,
                    title="transformer + Qwen3 (flow matching, velocity MSE)")

    step, _ = optimize(params, steps, lr, batch_loss, save, started, log, "transformer", minutes, save_every_minutes)
    shutil.rmtree(out.with_name(out.name + ".tokenizer"), ignore_errors=True)
    log(f"pretraining done: {step} steps in {time.time() - started:.0f}s; model in {out}")
    return json.loads((out / "pretrain_log.json").read_text())
