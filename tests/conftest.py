"""Shared fixtures: tiny SD and SDXL pipeline folders (built once per session) and a folder of subject photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dreambooth_lib.step as S
from dreambooth_lib import data
from dreambooth_lib.tiny import save_tiny_pipeline, save_tiny_sdxl_pipeline


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Stable Diffusion pipeline saved as a diffusers folder (32 px images)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A random tiny SDXL pipeline (StableDiffusionXLPipeline folder, 32 px images)."""
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl"))


def write_photos(folder: Path, n: int = 4, size: tuple[int, int] = (48, 40)) -> list[Path]:
    """n distinct small RGB photos (alternately PNG and JPG), named photo0.png, photo1.jpg, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.integers(0, 256, size=3)
        noise = rng.integers(-30, 31, size=(size[1], size[0], 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = folder / f"photo{i}.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray(pixels, "RGB").save(path)
        paths.append(path)
    return paths


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    """Folder with 4 small subject photos (48x40: larger than the tiny model's 32 px)."""
    folder = tmp_path / "instance"
    write_photos(folder)
    return folder


def fixed_batch_losses(state, steps: int = 8) -> list[float]:
    """Train `steps` train_steps and return the mean loss of one fixed batch (the dataset's first 4 items,
    4 fixed noise / timestep draws) before training and after every second step: only the weights change
    between the measurements, so a falling list means training learns this batch."""
    batch = data.collate_examples([state.dataset[i] for i in range(4)], with_prior=False)

    def fixed_loss() -> float:
        with torch.no_grad():
            z, c = S.latents_and_conditioning(batch, state.models, state.text_cache, True, torch.Generator(), "cpu",
                                              state.cfg)
            return sum(float(S.diffusion_loss(state.models.family, state.denoiser, state.models.noise_scheduler, z, c,
                                              state.cfg, False, torch.Generator().manual_seed(seed))[0])
                       for seed in range(4)) / 4

    losses = [fixed_loss()]
    for step in range(steps):
        S.train_step(state, step)
        if step % 2:
            losses.append(fixed_loss())
    return losses


def train_killed_after_checkpoint(monkeypatch, cfg, step: int, **train_kw) -> None:
    """Run train(cfg) as a process killed right after it wrote checkpoint-`step` (the KeyboardInterrupt is
    raised once that checkpoint is complete); the next train() of the same folder can resume from it."""
    import dreambooth_lib.checkpoint as CK
    import dreambooth_lib.train as T

    real_save = CK.save_checkpoint

    def save_then_die(output_dir, saved_step, *args, **kw):
        path = real_save(output_dir, saved_step, *args, **kw)
        if saved_step == step:
            raise KeyboardInterrupt
        return path

    with monkeypatch.context() as patched:
        patched.setattr(T, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            T.train(cfg, **train_kw)


CAPTIONS = ["a photo of sks dog", "sks dog on grass", "sks dog in snow", "sks dog at the beach"]


def cached_and_uncached_conditioning(cfg, instance_dir) -> tuple:
    """Three instance items (2, 1, 0: shuffled) + class rows in one batch, conditioned from the text cache and
    from the encoders: (batch, latents, cache, z, cached, uncached), for the FLUX families' pairing tests."""
    from dreambooth_lib import models as M

    models = M.load_models(cfg)
    pixels = data.pixel_values([im.image for im in data.load_instance_images(instance_dir, 32)], cfg, None)
    latents = S.cache_latents(models, pixels, seed=0)
    dataset = data.DreamBoothDataset(latents, CAPTIONS, latents[:1], "a photo of a dog")
    batch = data.collate_examples([dataset[i] for i in (2, 1, 0)], with_prior=True)
    cache = S.cache_text_embeddings(models, CAPTIONS + ["a photo of a dog"], cfg)
    z, cached = S.latents_and_conditioning(batch, models, cache, True, torch.Generator(), "cpu", cfg)
    _, uncached = S.latents_and_conditioning(batch, models, None, True, torch.Generator(), "cpu", cfg)
    return batch, latents, cache, z, cached, uncached


def flow_image(pipe, text_tokens: int):
    """A flow-matching pipeline's picture of "a photo of sks dog" as an array: seed 0, 2 steps, 32 px, the text
    at text_tokens (T5 / Qwen3 length): what the LoRA-scale tests compare, scale 0 against the base."""
    return pipe(prompt="a photo of sks dog", generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                max_sequence_length=text_tokens, height=32, width=32, output_type="np").images
