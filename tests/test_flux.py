"""FLUX.1 through the family seam: tiny random [dev] / [schnell] pipelines built in-process, saved and loaded
with from_pretrained; conditioning and packing against the stock FluxPipeline, the flow-matching objective
by hand, LoRA files stock diffusers loads, exact resume, bad input refused before model work."""

from __future__ import annotations

import math

import warnings

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

import dreambooth_lib.models as M
import dreambooth_lib.step as S
import dreambooth_lib.train as T
from dreambooth_lib import data, families, loss, memory
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.families import flux
from dreambooth_lib.sample import check_lora_fits, load_pipeline, scale_guidance_grid, set_lora_scales
from dreambooth_lib.tiny import save_tiny_flux_pipeline

from conftest import CAPTIONS, cached_and_uncached_conditioning, fixed_batch_losses, flow_image

PROMPTS = ["a photo of sks dog", "a dog in the snow", "sks dog"]
T5_TOKENS = 16  # max_sequence_length of the tiny runs


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """A tiny FLUX.1 [dev] pipeline folder (8x VAE: 32 px pictures are 4x4 latents, 2x2 packed tokens)."""
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux_dev"))


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux_schnell"), guidance_embeds=False)


def make_cfg(model, instance_dir, out, **kw) -> TrainConfig:
    base = dict(pretrained_model=str(model), instance_dir=str(instance_dir), output_dir=str(out), class_noun="dog",
                identifier="sks", resolution=32, with_prior_preservation=False, max_train_steps=2, learning_rate=1e-3,
                checkpointing_steps=0, validation_steps=0, optimizer="adamw", max_sequence_length=T5_TOKENS)
    return TrainConfig(**{**base, **kw})


def test_native_resolution_and_text_encoder_training_are_asked_of_the_family(flux_dir, tiny_model_dir):
    # 128 latent cells (FluxPipeline's default, set only on instances) x the 8x VAE; the tiny SD model: UNet 16 x 2
    assert families.native_resolution(str(flux_dir)) == 1024 and families.native_resolution(str(tiny_model_dir)) == 32
    assert families.trains_text_encoder(str(flux_dir)) and families.trains_text_encoder(str(tiny_model_dir))  # CLIP


def test_family_detected_and_bad_input_refused_before_model_work(flux_dir, schnell_dir, tiny_model_dir, instance_dir,
                                                                 tmp_path, monkeypatch):
    assert families.detect(str(flux_dir)) == families.detect(str(schnell_dir)) == "flux"
    assert families.of(make_cfg(flux_dir, instance_dir, tmp_path)) is flux
    monkeypatch.setattr(T, "load_tokenizer", lambda cfg: pytest.fail("bad input reached model work"))
    for bad, message in [(dict(resolution=40), "resolution = 40: FLUX.1 needs a multiple of 16"),
                         (dict(mixed_precision="fp16"), "mixed_precision = 'fp16': FLUX.1 was trained in bf16"),
                         (dict(prior_generation_precision="fp16"), "overflow fp16"),
                         (dict(snr_gamma=5.0), "snr_gamma = 5.0: Min-SNR weights DDPM"),
                         (dict(max_sequence_length=600), "at most 512"),
                         (dict(class_sampler="dpmsolver++"), "FLUX.1 samples with one of"),
                         (dict(weighting_scheme="uniform"), "weighting_scheme = 'uniform'")]:
        with pytest.raises(data.InputError, match=message):
            T.train(make_cfg(flux_dir, instance_dir, tmp_path / "run", **bad), progress=False)
    assert not (tmp_path / "run").exists()
    warned = []
    families.check(make_cfg(schnell_dir, instance_dir, tmp_path, training_guidance=3.5), warn=warned.append)
    families.check(make_cfg(flux_dir, instance_dir, tmp_path, training_guidance=3.5), warn=warned.append)
    assert len(warned) == 1 and "no guidance embedding" in warned[0]  # schnell only
    with pytest.raises(data.InputError, match="draws flow-matching sigmas"):  # and not for a DDPM family
        families.check(make_cfg(tiny_model_dir, instance_dir, tmp_path, weighting_scheme="logit_normal"))


def test_packed_latents_ids_and_conditioning_are_what_flux_pipeline_builds(flux_dir, instance_dir):
    cfg = make_cfg(flux_dir, instance_dir, "unused", training_guidance=2.0)
    models = M.load_models(cfg)
    pipe = FluxPipeline.from_pretrained(flux_dir)
    for part in (pipe.text_encoder, pipe.text_encoder_2):  # frozen like ours: with requires_grad T5's attention
        part.requires_grad_(False)  # takes another CPU kernel path (6e-7 apart)
    ours = S.encode_prompts(models, PROMPTS, cfg)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=T5_TOKENS)
    assert ours["encoder_hidden_states"].shape == (3, T5_TOKENS, 32) and ours["pooled_projections"].shape == (3, 32)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0, atol=0)

    # Latents: (E(x) - shift) * scale with FLUX.1's factors, one posterior draw.
    pixels = torch.stack(data.pixel_values([im.image for im in data.load_instance_images(instance_dir, 32)][:1], cfg, None))
    z = flux.encode_latents(models.vae, pixels, torch.Generator().manual_seed(0))
    sample = models.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, (sample - 0.1159) * 0.3611, rtol=0, atol=0)
    assert z.shape == (1, 4, 4, 4)

    # The transformer's inputs for one denoising step: the pipeline's (latents given packed) against ours.
    calls = []

    def record(**kw):
        calls.append(kw)
        return (torch.zeros_like(kw["hidden_states"]),)

    pipe.transformer.forward = record
    packed = FluxPipeline._pack_latents(z, 1, 4, 4, 4)
    pipe(prompt_embeds=embeds[:1], pooled_prompt_embeds=pooled[:1], latents=packed, height=32, width=32,
         num_inference_steps=1, guidance_scale=2.0, output_type="latent")
    sigma = pipe.scheduler.sigmas[:1]  # the (size-shifted) sigma the pipeline started from
    cond = flux.denoiser_conditioning({k: v[:1] for k, v in ours.items()}, None, cfg, models.denoiser.config)
    out = flux.predict(pipe.transformer, z, sigma, cond)
    theirs, mine = calls
    assert set(theirs) >= set(mine) - {"return_dict"}
    for key in ("hidden_states", "img_ids", "txt_ids", "encoder_hidden_states", "pooled_projections", "guidance"):
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(mine["timestep"], theirs["timestep"])  # t / 1000 == sigma up to rounding
    assert theirs["img_ids"].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]  # (0, row, col) per 2x2 patch
    assert torch.equal(out, torch.zeros_like(z))  # unpacked back to [B, C, H, W]
    assert torch.equal(FluxPipeline._unpack_latents(packed, 4, 4, 1), z)


def test_flow_matching_noising_target_and_weights_hand_computed(flux_dir, instance_dir):
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]]).view(2, 1, 1, 2)
    eps = torch.tensor([[0.0, 4.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    noisy, target = flux.noisy_and_target(None, x, eps, torch.tensor([0.25, 1.0]))
    # s = 0.25: 0.75 * [1, 2] + 0.25 * [0, 4] = [0.75, 2.5];  s = 1: pure noise [1, 1]
    torch.testing.assert_close(noisy.flatten(1), torch.tensor([[0.75, 2.5], [1.0, 1.0]]))
    torch.testing.assert_close(target.flatten(1), torch.tensor([[-1.0, 2.0], [-2.0, 2.0]]))  # eps - x
    cfg = make_cfg(flux_dir, instance_dir, "unused")
    scheduler = M.load_models(cfg).noise_scheduler
    s = torch.tensor([0.5, 0.25])
    torch.testing.assert_close(flux.loss_weighting(scheduler, s, cfg), torch.ones(2))  # "none": unweighted
    torch.testing.assert_close(flux.loss_weighting(scheduler, s, make_cfg(flux_dir, instance_dir, "u", weighting_scheme="sigma_sqrt")),
                               torch.tensor([4.0, 16.0]))
    torch.testing.assert_close(flux.loss_weighting(scheduler, s, make_cfg(flux_dir, instance_dir, "u", weighting_scheme="cosmap")),
                               2 / (math.pi * (1 - 2 * s + 2 * s ** 2)))
    # "none": u ~ U(0, 1) from the generator; sigma = the unshifted schedule's entry floor(1000 u): 1 - index / 1000.
    u = torch.rand(5, generator=torch.Generator().manual_seed(7))
    sigmas = flux.draw_timesteps(scheduler, torch.zeros(5, 4, 4, 4), cfg, torch.Generator().manual_seed(7))
    torch.testing.assert_close(sigmas, 1 - (u * 1000).floor() / 1000)


@pytest.mark.parametrize("scheme, mean, below_tenth", [("none", 0.5, 0.10), ("logit_normal", 0.5, 0.014),
                                                        ("mode", 0.5, 0.047)])
def test_sigma_densities_means_and_shapes(scheme, mean, below_tenth, flux_dir, instance_dir):
    cfg = make_cfg(flux_dir, instance_dir, "unused", weighting_scheme=scheme)
    scheduler = M.load_models(cfg).noise_scheduler
    sigmas = flux.draw_timesteps(scheduler, torch.zeros(20000, 1, 2, 2), cfg, torch.Generator().manual_seed(0))
    assert sigmas.shape == (20000,) and 0 < sigmas.min() and sigmas.max() <= 1
    # uniform: 10 %; logit-normal (0, 1): P(s < 0.1) = Phi(-2.2) = 1.4 %; mode 1.29: 4.7 % (its formula on 2M
    # float64 draws); all three centred on 0.5
    assert float(sigmas.mean()) == pytest.approx(mean, abs=0.01)
    assert float((sigmas < 0.1).float().mean()) == pytest.approx(below_tenth, abs=0.006)


def test_cached_conditioning_equals_uncached_and_rows_stay_paired(flux_dir, instance_dir):
    cfg = make_cfg(flux_dir, instance_dir, "unused")
    batch, latents, cache, z, cached, uncached = cached_and_uncached_conditioning(cfg, instance_dir)
    captions = CAPTIONS
    assert cached.keys() == uncached.keys() == {"encoder_hidden_states", "pooled_projections", "guidance"}
    for key in cached:
        torch.testing.assert_close(cached[key], uncached[key], rtol=0, atol=0)
    assert cached["guidance"].tolist() == [1.0] * 6  # training_guidance None: 1.0
    assert batch["prompts"] == [captions[2], captions[1], captions[0]] + ["a photo of a dog"] * 3
    for row, prompt in enumerate(batch["prompts"]):
        assert torch.equal(z[row], latents[captions.index(prompt) if row < 3 else 0])
        assert torch.equal(cached["pooled_projections"][row], cache[prompt]["pooled_projections"])


def test_instance_and_class_halves_get_their_own_weighting():
    # rows [inst at s=0.5, class at s=0.25], sigma_sqrt weights 4 and 16; MSEs 2.5 and 2.0.
    pred, target = torch.tensor([[1.0, 2.0], [3.0, 1.0]]).view(2, 1, 1, 2), torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    weights = flux.loss_weighting(None, torch.tensor([0.5, 0.25]), TrainConfig(weighting_scheme="sigma_sqrt"))
    total, parts = loss.dreambooth_loss(pred, target, with_prior=True, prior_loss_weight=0.5, weighting=weights)
    assert parts["instance_loss"].item() == pytest.approx(2.5 * 4) and parts["prior_loss"].item() == pytest.approx(2.0 * 16)
    assert total.item() == pytest.approx(10 + 0.5 * 32)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_short_runs_lower_the_loss_on_a_fixed_batch(mode, flux_dir, instance_dir, tmp_path):
    extra = dict(learning_rate=2e-3) if mode == "full" else dict(use_lora=True, lora_rank=8, learning_rate=2e-2)
    cfg = make_cfg(flux_dir, instance_dir, tmp_path, train_text_encoder=True, **extra)
    pixels = data.pixel_values([im.image for im in data.load_instance_images(instance_dir, 32)], cfg, None)
    state = T.prepare_training(cfg, M.load_models(cfg), T.make_accelerator(cfg), pixels, ["a photo of sks dog"] * 4,
                               log=lambda _: None)
    losses = fixed_batch_losses(state)  # before training, then every second of 8 steps
    # Measured on this tiny model: full 1.236 -> 1.027, LoRA 1.236 -> 1.092, falling at every check.
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.92 * losses[0], losses


def test_lora_loads_in_the_stock_pipeline_scale_zero_is_the_base(flux_dir, schnell_dir, instance_dir, tmp_path,
                                                                 tiny_model_dir):
    # lora_alpha != rank: the file's LoraConfig metadata keeps the scale alpha / r = 2 in stock diffusers.
    cfg = make_cfg(flux_dir, instance_dir, tmp_path / "run", use_lora=True, train_text_encoder=True, lora_rank=4,
                   lora_alpha=8, learning_rate=5e-2, max_train_steps=2)
    T.train(cfg, progress=False, log=lambda *_: None)
    state = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in state} == {"transformer", "text_encoder"}  # T5 stays frozen
    assert any(".ff_context.net.2.lora_A" in k for k in state)  # diffusers' default FLUX targets
    stock = FluxPipeline.from_pretrained(flux_dir)
    stock.load_lora_weights(tmp_path / "run", adapter_name="subject")
    assert {m.scaling["subject"] for m in stock.transformer.modules() if hasattr(m, "scaling")} == {2.0}

    base = flow_image(FluxPipeline.from_pretrained(flux_dir), T5_TOKENS)
    pipe = load_pipeline(flux_dir, lora_dir=tmp_path / "run", device="cpu")
    set_lora_scales(pipe, denoiser=0.0, text_encoder=0.0)
    assert np.array_equal(flow_image(pipe, T5_TOKENS), base)
    set_lora_scales(pipe, denoiser=1.0, text_encoder=0.0)
    only_transformer = flow_image(pipe, T5_TOKENS)
    set_lora_scales(pipe, denoiser=1.0, text_encoder=1.0)
    both = flow_image(pipe, T5_TOKENS)
    assert np.abs(only_transformer - base).max() > 1e-4 and np.abs(both - only_transformer).max() > 1e-5
    # The guidance x scale grid says its knob is [dev]'s distilled guidance input, and it moves the picture.
    grid, params = scale_guidance_grid(pipe, "sks dog", [1.0], [1.0, 3.5], seed=0, num_inference_steps=2)
    assert params["guidance"].startswith("distilled guidance embedding")
    cells = np.asarray(grid).astype(int).reshape(2, grid.height // 2, grid.width, 3)  # rows: guidance 1, 3.5
    assert np.abs(cells[0, grid.height // 4:] - cells[1, grid.height // 4:]).max() > 0  # below the labels: it moved
    # Another family's model is refused before loading: an SD model for this file (and schnell's width fits).
    with pytest.raises(data.InputError, match=r"has weights for \['transformer'\], which sd models lack"):
        check_lora_fits(tmp_path / "run" / "pytorch_lora_weights.safetensors", str(tiny_model_dir), families.sd)
    check_lora_fits(tmp_path / "run" / "pytorch_lora_weights.safetensors", str(schnell_dir), flux)


def test_the_wide_preset_is_every_linear_layer_of_the_blocks_and_stock_diffusers_loads_it(flux_dir, instance_dir,
                                                                                           tmp_path):
    # ai-toolkit's FLUX LoRA: the blocks' Linear layers, modulations included; not the embedders nor the output
    # projection after the blocks, whose name ("proj_out") the single blocks' own shares (LORA_EXCLUDED).
    cfg = make_cfg(flux_dir, instance_dir, tmp_path / "run", use_lora=True, lora_rank=4, lora_modules=["wide"],
                   learning_rate=5e-2)
    T.train(cfg, progress=False, log=lambda *_: None)
    trained = {k[len("transformer."):-len(".lora_A.weight")]
               for k in load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors") if k.endswith(".lora_A.weight")}
    base = FluxPipeline.from_pretrained(flux_dir)
    blocks = {n for n, m in base.transformer.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert trained == blocks and {"single_transformer_blocks.0.proj_out", "transformer_blocks.0.norm1.linear"} <= trained
    stock = FluxPipeline.from_pretrained(flux_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*exclude_modules")  # the file's config names the layers themselves
        stock.load_lora_weights(tmp_path / "run", adapter_name="subject")
    assert {n.removesuffix(".lora_A") for n, m in stock.transformer.named_modules() if n.endswith(".lora_A")} == blocks
    stock.set_adapters("subject", adapter_weights=0.0)
    assert np.array_equal(flow_image(stock, T5_TOKENS), flow_image(base, T5_TOKENS))
    stock.set_adapters("subject", adapter_weights=1.0)
    assert np.abs(flow_image(stock, T5_TOKENS) - flow_image(base, T5_TOKENS)).max() > 1e-4


@pytest.mark.parametrize("variant", ["dev-clip-trained", "schnell-text-cached"])
def test_full_fine_tune_resumes_exactly_and_saves_a_pipeline(variant, flux_dir, schnell_dir, instance_dir, tmp_path):
    # Prior preservation through the class-image cache (class images from the frozen FluxPipeline); [dev] with
    # CLIP trained (text encoded each step), [schnell] (no guidance input) with text conditioning cached.
    model, clip = (flux_dir, True) if variant.startswith("dev") else (schnell_dir, False)
    common = dict(max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear", train_text_encoder=clip,
                  with_prior_preservation=True, num_class_images=2, class_inference_steps=1,
                  class_dir=str(tmp_path / "class"), train_batch_size=2, weighting_scheme="logit_normal")
    whole = T.train(make_cfg(model, instance_dir, tmp_path / "whole", **common), progress=False, log=lambda *_: None)
    resumed = T.train(make_cfg(model, instance_dir, tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"),
                               **common), progress=False, log=lambda *_: None)
    assert [h["loss"] for h in resumed["loss_history"]] == [h["loss"] for h in whole["loss_history"]]
    assert all(h["prior_loss"] > 0 for h in whole["loss_history"])
    parts = ["transformer/diffusion_pytorch_model.safetensors"] + (["text_encoder/model.safetensors"] if clip else [])
    for part in parts:
        a, b = load_file(tmp_path / "whole" / part), load_file(tmp_path / "resumed" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert not (tmp_path / "whole" / "checkpoint-2" / "text_encoder_2").exists()  # T5 is never trained
    manifest = (tmp_path / "class" / "manifest.json").read_text()
    assert '"family": "flux"' in manifest and '"guidance_scale": 3.5' in manifest and "FlowMatchEulerDiscreteScheduler" in manifest
    pipe = FluxPipeline.from_pretrained(tmp_path / "whole")  # a complete pipeline folder, T5 included
    assert pipe.text_encoder_2 is not None and type(load_pipeline(tmp_path / "whole", device="cpu")) is FluxPipeline


def test_the_prompt_cache_with_t5_streamed_equals_it_resident(flux_dir, instance_dir, tmp_path, monkeypatch):
    # On a GPU: T5-XXL (9.5 GB) beside a QLoRA run's NF4 transformer on a 16 GB card; here the choice is forced and
    # accelerate streams it from the CPU to the CPU: the same cache, its inputs sent where its hooks compute.
    cfg = make_cfg(flux_dir, instance_dir, tmp_path)
    models = M.load_models(cfg)
    clip, t5 = models.text_encoders
    prompts = ["a photo of sks dog", "a photo of a dog"]
    resident = S.cache_text_embeddings(models, prompts, cfg)
    monkeypatch.setattr(memory, "to_be_streamed", lambda encoder, home, device: encoder is t5)
    lines = []
    with memory.text_encoders_on(models.text_encoders, "cpu", lines.append):
        assert {p.device.type for p in t5.parameters()} == {"meta"} and {p.device.type for p in clip.parameters()} == {"cpu"}
        streamed = S.cache_text_embeddings(models, prompts, cfg)
    assert len(lines) == 1 and "T5EncoderModel" in lines[0] and "streamed layer by layer" in lines[0]
    assert all(torch.equal(streamed[p][k], resident[p][k]) for p in prompts for k in resident[p])
    assert {t.device.type for t in (*t5.parameters(), *t5.buffers())} == {"cpu"}
