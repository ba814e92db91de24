"""FLUX.2 [klein] through the family seam: a tiny random Flux2KleinPipeline built in-process (Qwen2 BPE tokenizer,
28-layer Qwen3), saved and loaded with from_pretrained; conditioning, latents and packing against the stock
pipeline's, loss going down, exact resume, LoRA files stock diffusers loads (ours and the kohya export), FLUX.1 /
FLUX.2 LoRAs told apart."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from safetensors.torch import load_file

import dreambooth_lib.models as M
import dreambooth_lib.step as S
import dreambooth_lib.train as T
from dreambooth_lib import data, families, memory
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.export import export_lora
from dreambooth_lib.families import flux, flux2
from dreambooth_lib.sample import check_lora_fits, load_pipeline, render_validation, scale_guidance_grid, set_lora_scales
from dreambooth_lib.tiny import save_tiny_flux2_pipeline, save_tiny_flux_pipeline

from conftest import CAPTIONS, cached_and_uncached_conditioning, fixed_batch_losses

PROMPTS = ["a photo of sks dog", "a dog in the snow", "sks dog"]
TOKENS = 40  # max_sequence_length of the tiny runs: the chat template alone is ~25 tokens


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    """A tiny FLUX.2 [klein] base pipeline folder (8x VAE: 32 px pictures are 2x2 patchified latent cells)."""
    return save_tiny_flux2_pipeline(tmp_path_factory.mktemp("klein"))


def make_cfg(model, instance_dir, out, **kw) -> TrainConfig:
    base = dict(pretrained_model=str(model), instance_dir=str(instance_dir), output_dir=str(out), class_noun="dog",
                identifier="sks", resolution=32, with_prior_preservation=False, max_train_steps=2, learning_rate=1e-3,
                checkpointing_steps=0, validation_steps=0, optimizer="adamw", max_sequence_length=TOKENS)
    return TrainConfig(**{**base, **kw})


def test_family_detected_and_bad_input_refused_before_model_work(klein_dir, instance_dir, tmp_path, monkeypatch):
    assert families.detect(str(klein_dir)) == "flux2"
    assert families.of(make_cfg(klein_dir, instance_dir, tmp_path)) is flux2
    assert flux2.native_resolution(str(klein_dir)) == families.native_resolution(str(klein_dir)) == 1024  # 128 cells x 8
    assert not families.trains_text_encoder(str(klein_dir))  # no Qwen3 LoRA: the notebooks' LoRA runs leave it off
    assert families.trains_text_encoder(str(klein_dir), lora=False)  # a full fine-tune may train Qwen3
    monkeypatch.setattr(T, "load_tokenizer", lambda cfg: pytest.fail("bad input reached model work"))
    for bad, message in [(dict(resolution=40), r"resolution = 40: FLUX.2 \[klein\] needs a multiple of 16"),
                         (dict(mixed_precision="fp16"), "mixed_precision = 'fp16': FLUX.2"),
                         (dict(snr_gamma=5.0), "snr_gamma = 5.0"),
                         (dict(train_text_encoder=True, use_lora=True), "loads transformer LoRA only"),
                         (dict(max_sequence_length=600), "at most 512")]:
        with pytest.raises(data.InputError, match=message):
            T.train(make_cfg(klein_dir, instance_dir, tmp_path / "run", **bad), progress=False)
    assert not (tmp_path / "run").exists()
    warned = []
    families.check(make_cfg(klein_dir, instance_dir, tmp_path, training_guidance=3.5), warn=warned.append)
    assert len(warned) == 1 and "no guidance embedding" in warned[0]


def test_conditioning_latents_and_packing_are_what_the_stock_pipeline_builds(klein_dir, instance_dir):
    cfg = make_cfg(klein_dir, instance_dir, "unused")
    models = M.load_models(cfg)
    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    pipe.text_encoder.requires_grad_(False)
    ours = S.encode_prompts(models, PROMPTS, cfg)
    embeds, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=TOKENS)
    assert ours.keys() == {"encoder_hidden_states"} and ours["encoder_hidden_states"].shape == (3, TOKENS, 48)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)

    # Latents: the posterior's mode, patchified, normalised by the VAE's batch-norm statistics: what the
    # pipeline's own image encoding gives; by hand, channel 0 of patch (0, 0) is the mode's pixel (0, 0).
    pixels = torch.stack(data.pixel_values([im.image for im in data.load_instance_images(instance_dir, 32)][:2], cfg, None))
    z = flux2.encode_latents(models.vae, pixels, None)
    torch.testing.assert_close(z, pipe._encode_vae_image(pixels, None), rtol=0, atol=0)
    mode = models.vae.encode(pixels).latent_dist.mode()
    bn = models.vae.bn
    torch.testing.assert_close(z[:, 0, 0, 0], (mode[:, 0, 0, 0] - bn.running_mean[0]) / (bn.running_var[0] + 1e-4).sqrt())
    torch.testing.assert_close(z[:, 1, 0, 0], (mode[:, 0, 0, 1] - bn.running_mean[1]) / (bn.running_var[1] + 1e-4).sqrt())
    assert z.shape == (2, 16, 2, 2) and bn.running_mean.abs().max() > 0.1  # statistics that matter

    # The transformer's inputs for one denoising step: the pipeline's (latents given) against ours.
    calls = []

    def record(**kw):
        calls.append(kw)
        return (torch.zeros_like(kw["hidden_states"]),)

    pipe.transformer.forward = record
    pipe(prompt_embeds=embeds[:1], latents=z[:1], height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
         output_type="latent")
    sigma = pipe.scheduler.sigmas[:1]
    cond = flux2.denoiser_conditioning({k: v[:1] for k, v in ours.items()}, None, cfg, models.denoiser.config)
    out = flux2.predict(pipe.transformer, z[:1], sigma, cond)
    theirs, mine = calls
    assert set(theirs) >= set(mine) - {"return_dict"}
    for key in ("hidden_states", "img_ids", "txt_ids", "encoder_hidden_states"):
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0, msg=key)
    assert mine["guidance"] is None and theirs["guidance"] is None
    torch.testing.assert_close(mine["timestep"], theirs["timestep"])  # t / 1000 == sigma up to rounding
    assert theirs["img_ids"][0].tolist() == [[0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0]]  # (0, row, col, 0)
    assert theirs["txt_ids"][0, :3].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]
    assert torch.equal(out, torch.zeros_like(z[:1]))
    # predict's unpacking is the inverse of the pipeline's packing (values, not zeros)
    packed = Flux2KleinPipeline._pack_latents(z)
    ids = Flux2KleinPipeline._prepare_latent_ids(z)
    assert torch.equal(Flux2KleinPipeline._unpack_latents_with_ids(packed, ids, 2, 2), z)
    assert torch.equal(flux2.predict(lambda **kw: (kw["hidden_states"],), z, sigma.expand(2), dict(ours, encoder_hidden_states=ours["encoder_hidden_states"][:2])), z)


def test_cached_conditioning_equals_uncached_and_rows_stay_paired(klein_dir, instance_dir):
    cfg = make_cfg(klein_dir, instance_dir, "unused")
    batch, latents, cache, z, cached, uncached = cached_and_uncached_conditioning(cfg, instance_dir)
    captions = CAPTIONS
    assert cached.keys() == uncached.keys() == {"encoder_hidden_states"}
    torch.testing.assert_close(cached["encoder_hidden_states"], uncached["encoder_hidden_states"], rtol=0, atol=0)
    for row, prompt in enumerate(batch["prompts"]):
        assert torch.equal(z[row], latents[captions.index(prompt) if row < 3 else 0])
        assert torch.equal(cached["encoder_hidden_states"][row], cache[prompt]["encoder_hidden_states"])
    assert not torch.equal(cache[captions[0]]["encoder_hidden_states"], cache[captions[1]]["encoder_hidden_states"])


@pytest.mark.parametrize("distilled", [False, True])
def test_validation_grids_guide_the_base_and_not_the_distilled_model(distilled, instance_dir, tmp_path):
    # The grid's pipeline is built from the live components; it takes is_distilled from model_index.json as
    # from_pretrained does: [klein] base runs two transformer passes per step (classifier-free), distilled one.
    model = save_tiny_flux2_pipeline(tmp_path / "model", is_distilled=distilled)
    cfg = make_cfg(model, instance_dir, tmp_path / "run", validation_guidance_scale=4.0, validation_inference_steps=2,
                   num_validation_images=1)
    models = M.load_models(cfg)
    calls = []
    forward = models.denoiser.forward
    models.denoiser.forward = lambda **kw: calls.append(1) or forward(**kw)
    render_validation(models, models.denoiser, models.text_encoders, ["sks dog"], cfg, tmp_path / "grid.png",
                      contextlib.nullcontext())
    assert len(calls) == (2 if distilled else 4) and (tmp_path / "grid.png").is_file()


def test_a_frozen_text_encoder_that_does_not_fit_beside_training_is_streamed_for_the_grid(klein_dir, instance_dir,
                                                                                           tmp_path, monkeypatch):
    # On a GPU: Qwen3 (8 GB for the 4B) beside the training state; here the choice is forced and accelerate
    # streams it from the CPU to the CPU: the same grid, and the encoder whole afterwards.

    cfg = families.with_family_defaults(make_cfg(klein_dir, instance_dir, tmp_path / "run", validation_inference_steps=2,
                                                 num_validation_images=2))
    models = M.load_models(cfg)
    weights = {k: v.clone() for k, v in models.text_encoders[0].state_dict().items()}

    def grid(name):
        render_validation(models, models.denoiser, models.text_encoders, ["sks dog"], cfg, tmp_path / name,
                          contextlib.nullcontext())
        return np.asarray(Image.open(tmp_path / name))

    resident = grid("resident.png")
    assert resident.shape[:2] == (cfg.resolution, 2 * cfg.resolution)  # 1 x 2 cells at the training side, not 1024 px
    streamed_calls = []
    monkeypatch.setattr(memory, "to_be_streamed", lambda encoder, home, device: streamed_calls.append(home) or True)
    # A GPU pipeline's device is the component on the accelerator (DiffusionPipeline.device skips CPU and meta
    # ones); with everything on the CPU it is the first, the streamed encoder on meta: pinned to the CPU here.
    monkeypatch.setattr(Flux2KleinPipeline, "device", property(lambda self: torch.device("cpu")))
    assert np.array_equal(grid("streamed.png"), resident) and streamed_calls
    encoder = models.text_encoders[0]
    assert not any(hasattr(m, "_hf_hook") for m in encoder.modules())
    assert all(t.device.type == "cpu" for t in (*encoder.parameters(), *encoder.buffers()))  # not left on meta
    assert all(torch.equal(v, weights[k]) for k, v in encoder.state_dict().items())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_short_runs_lower_the_loss_on_a_fixed_batch(mode, klein_dir, instance_dir, tmp_path):
    extra = dict(learning_rate=2e-3) if mode == "full" else dict(use_lora=True, lora_rank=8, learning_rate=5e-2)
    cfg = make_cfg(klein_dir, instance_dir, tmp_path, **extra)
    pixels = data.pixel_values([im.image for im in data.load_instance_images(instance_dir, 32)], cfg, None)
    state = T.prepare_training(cfg, M.load_models(cfg), T.make_accelerator(cfg), pixels, ["a photo of sks dog"] * 4,
                               log=lambda _: None)
    losses = fixed_batch_losses(state)  # before training, then every second of 8 steps
    # Measured on this tiny model: full 1.605 -> 1.343, LoRA (lr 0.05) 1.605 -> 1.419, falling at every check
    # (lr 0.1 rose at the third check after write_qwen_tokenizer made each word one token; 0.03 fell too little).
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.92 * losses[0], losses


def test_full_fine_tune_with_prior_preservation_resumes_exactly(klein_dir, instance_dir, tmp_path):
    # Class images from the frozen Flux2KleinPipeline through the class-image cache; text conditioning cached.
    common = dict(max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear", with_prior_preservation=True,
                  num_class_images=2, class_inference_steps=1, class_dir=str(tmp_path / "class"), train_batch_size=2,
                  weighting_scheme="logit_normal")
    whole = T.train(make_cfg(klein_dir, instance_dir, tmp_path / "whole", **common), progress=False, log=lambda *_: None)
    resumed = T.train(make_cfg(klein_dir, instance_dir, tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"),
                               **common), progress=False, log=lambda *_: None)
    assert [h["loss"] for h in resumed["loss_history"]] == [h["loss"] for h in whole["loss_history"]]
    assert all(h["prior_loss"] > 0 for h in whole["loss_history"])
    a = load_file(tmp_path / "whole" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = (tmp_path / "class" / "manifest.json").read_text()
    assert '"family": "flux2"' in manifest and '"guidance_scale": 4.0' in manifest
    assert type(load_pipeline(tmp_path / "whole", device="cpu")) is Flux2KleinPipeline  # a complete pipeline folder


def test_full_fine_tune_trains_qwen3_with_train_text_encoder_and_resumes_exactly(klein_dir, instance_dir, tmp_path):
    """Qwen3 in a full fine-tune (not diffusers' klein recipe: its text encoder stays frozen there): no text cache,
    the encoder's weights move, the run folder's text_encoder holds them, and a resumed run equals the whole one."""
    common = dict(max_train_steps=4, checkpointing_steps=2, train_text_encoder=True, text_encoder_lr=1e-3)
    whole = T.train(make_cfg(klein_dir, instance_dir, tmp_path / "whole", **common), progress=False, log=lambda *_: None)
    resumed = T.train(make_cfg(klein_dir, instance_dir, tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"),
                               **common), progress=False, log=lambda *_: None)
    assert [h["loss"] for h in resumed["loss_history"]] == [h["loss"] for h in whole["loss_history"]]
    saved = {run: Flux2KleinPipeline.from_pretrained(tmp_path / run).text_encoder.state_dict() for run in ("whole", "resumed")}
    base = Flux2KleinPipeline.from_pretrained(klein_dir).text_encoder.state_dict()
    assert all(torch.equal(saved["whole"][k], saved["resumed"][k]) for k in base)
    assert any(not torch.equal(saved["whole"][k], base[k]) for k in base)


def test_lora_loads_in_the_stock_pipeline_and_families_refuse_each_others(klein_dir, instance_dir, tmp_path):
    # lora_alpha != rank: the file's LoraConfig metadata keeps the scale alpha / r = 2 in stock diffusers.
    cfg = make_cfg(klein_dir, instance_dir, tmp_path / "run", use_lora=True, lora_rank=4, lora_alpha=8,
                   learning_rate=5e-2, max_train_steps=2)
    T.train(cfg, progress=False, log=lambda *_: None)
    lora_file = tmp_path / "run" / "pytorch_lora_weights.safetensors"
    state = load_file(lora_file)
    assert {k.split(".")[0] for k in state} == {"transformer"}
    assert any(k.endswith("attn.to_qkv_mlp_proj.lora_A.weight") for k in state)  # the default preset's single block
    stock = Flux2KleinPipeline.from_pretrained(klein_dir)
    stock.load_lora_weights(tmp_path / "run", adapter_name="subject")
    assert {m.scaling["subject"] for m in stock.transformer.modules() if hasattr(m, "scaling")} == {2.0}

    kw = dict(num_inference_steps=2, max_sequence_length=TOKENS, height=32, width=32, output_type="np")
    def image(pipe):
        return pipe(prompt="a photo of sks dog", generator=torch.Generator().manual_seed(0), **kw).images
    base = image(Flux2KleinPipeline.from_pretrained(klein_dir))
    pipe = load_pipeline(tmp_path / "run", device="cpu")  # the run folder: its base model + its LoRA
    set_lora_scales(pipe, denoiser=0.0, text_encoder=0.0)
    assert np.array_equal(image(pipe), base)
    set_lora_scales(pipe, denoiser=1.0, text_encoder=0.0)
    assert np.abs(image(pipe) - base).max() > 1e-4
    # The guidance x scale grid labels [klein]'s knob classifier-free guidance, and it moves the picture.
    grid, params = scale_guidance_grid(pipe, "sks dog", [1.0], [1.0, 4.0], seed=0, num_inference_steps=2)
    assert params["guidance"].startswith("classifier-free guidance (FLUX.2")
    cells = np.asarray(grid).astype(int).reshape(2, grid.height // 2, grid.width, 3)  # rows: guidance 1, 4
    assert np.abs(cells[0, grid.height // 4:] - cells[1, grid.height // 4:]).max() > 0  # below the labels: it moved

    # A FLUX.1 LoRA on [klein] and the reverse are refused before any weights load, by layer names / widths.
    flux_dir = save_tiny_flux_pipeline(tmp_path / "flux1")
    with pytest.raises(data.InputError, match=r"not trained on .*\(flux\): its layer transformer\.\S+ is not a layer "
                                              r"of this FLUX\.1 transformer"):
        check_lora_fits(lora_file, str(flux_dir), flux)
    T.train(make_cfg(flux_dir, instance_dir, tmp_path / "flux_run", use_lora=True, lora_rank=4, lora_modules=["attention"],
                     max_sequence_length=16), progress=False, log=lambda *_: None)
    # FLUX.1's attention preset includes its single blocks' to_q / to_k / to_v, which [klein] fuses
    with pytest.raises(data.InputError, match=r"\(flux2\): its layer transformer\.single_transformer_blocks\.0\.attn\.to_k "
                                              r"is not a layer of this FLUX\.2 \[klein\] transformer"):
        check_lora_fits(tmp_path / "flux_run" / "pytorch_lora_weights.safetensors", str(klein_dir), flux2)
    # double-block attention only: the same names in both families, told apart by widths (this FLUX.1 is 64 wide)
    wide_dir = save_tiny_flux_pipeline(tmp_path / "flux1_wide", width=64, latent_channels=16)
    T.train(make_cfg(wide_dir, instance_dir, tmp_path / "wide_run", use_lora=True, lora_rank=4, max_sequence_length=16,
                     lora_modules=["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj"]),
            progress=False, log=lambda *_: None)
    with pytest.raises(data.InputError, match=r"\(flux2\): its layer transformer\.transformer_blocks\.0\.attn\.add_k_proj "
                                              r"is \[4, 64\] \(lora_A.weight\), this FLUX\.2 \[klein\] model's layer \(32, 32\)"):
        check_lora_fits(tmp_path / "wide_run" / "pytorch_lora_weights.safetensors", str(klein_dir), flux2)
    check_lora_fits(lora_file, str(klein_dir), flux2)  # its own model fits

    # export-lora --format kohya: sd-scripts' names, which diffusers' FLUX.2 reader maps back to the same updates.
    out = export_lora(tmp_path / "run")
    kohya = load_file(out)
    assert {k.rsplit(".", 2)[0] if "lora_" in k.split(".", 1)[1] else k.rsplit(".", 1)[0] for k in kohya} == {
        f"lora_unet_double_blocks_0_{n}" for n in ("img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj",
                                                    "img_mlp_0", "img_mlp_2", "txt_mlp_0", "txt_mlp_2")} | {
        "lora_unet_single_blocks_0_linear1"}
    # q, k, v fused: rank 3 x 4, block-diagonal up; alpha 3 x 8 keeps the scale 8 / 4 = 2; linear1 is one layer
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 24.0
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (288, 4)
    assert float(kohya["lora_unet_single_blocks_0_linear1.alpha"]) == 8.0
    assert torch.equal(load_file(export_lora(lora_file, tmp_path / "bare.safetensors"))[  # the bare file: by layer names
        "lora_unet_single_blocks_0_linear1.lora_down.weight"], kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"])
    ours, theirs = Flux2KleinPipeline.from_pretrained(klein_dir), Flux2KleinPipeline.from_pretrained(klein_dir)
    ours.load_lora_weights(tmp_path / "run", adapter_name="a")
    theirs.load_lora_weights(out, adapter_name="a")  # through diffusers' _convert_kohya_flux2_lora_to_diffusers

    def deltas(model):  # {module: scaling x B @ A}, the update each LoRA layer adds
        return {n: (m.scaling["a"] * m.lora_B["a"].weight @ m.lora_A["a"].weight).detach()
                for n, m in model.named_modules() if hasattr(m, "lora_A") and "a" in m.lora_A}

    a, b = deltas(ours.transformer), deltas(theirs.transformer)
    assert a.keys() == b.keys() and len(a) == 13
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)
    assert max(float(d.abs().max()) for d in a.values()) > 1e-4  # trained, not the zero init
