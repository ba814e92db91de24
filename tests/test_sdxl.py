"""SDXL through the same library code as SD, on a tiny random SDXL (tiny.save_tiny_sdxl_pipeline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

import dreambooth_lib.class_images as CI
import dreambooth_lib.models as M
import dreambooth_lib.step as S
import dreambooth_lib.validate as V
import dreambooth_lib.weights as W
import dreambooth_lib.train as T
from dreambooth_lib import data, families
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.sample import generate, load_pipeline, set_lora_scales

from conftest import fixed_batch_losses, train_killed_after_checkpoint

PROMPTS = ["a photo of sks dog", "sks dog on grass", "a photo of a dog"]


def make_cfg(model, instance_dir, out, **kw) -> TrainConfig:
    base = dict(pretrained_model=str(model), instance_dir=str(instance_dir), output_dir=str(out), class_noun="dog",
                identifier="sks", resolution=32, with_prior_preservation=False, max_train_steps=2,
                learning_rate=1e-3, checkpointing_steps=0, validation_steps=0, num_validation_images=1,
                validation_inference_steps=2, optimizer="adamw")
    return TrainConfig(**{**base, **kw})


def test_conditioning_and_time_ids_are_what_the_sdxl_pipeline_builds(tiny_sdxl_dir, instance_dir):
    cfg = make_cfg(tiny_sdxl_dir, instance_dir, "unused")
    assert families.detect(str(tiny_sdxl_dir)) == "sdxl" and families.native_resolution(str(tiny_sdxl_dir)) == 32
    models = M.load_models(cfg)
    assert models.family.NAME == "sdxl" and models.tokenizers[1].pad_token == "!"
    ours = S.encode_prompts(models, PROMPTS, cfg)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert ours["encoder_hidden_states"].shape == (3, 16, 16 + 24) and ours["text_embeds"].shape == (3, 20)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["text_embeds"], pooled, rtol=0, atol=0)

    # A 48x40 photo at 32 px: short side 40 -> 32, width 48 -> 38; the centre crop starts 3 px in.
    photo = data.load_instance_images(instance_dir, 32)[0].image
    _, sizes = data.pixels_and_sizes([photo], cfg, None)
    assert sizes == [[40, 48, 0, 3, 32, 32]]
    expected = pipe._get_add_time_ids((40, 48), (0, 3), (32, 32), torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    cond = families.sdxl.denoiser_conditioning({k: v[:1] for k, v in ours.items()}, torch.tensor(sizes, dtype=torch.float32),
                                               cfg, models.denoiser.config)
    torch.testing.assert_close(cond["added_cond_kwargs"]["time_ids"], expected, rtol=0, atol=0)
    # Mirrored pictures: SDXL flips before cropping, so the crop is measured from the other side.
    crop = data.Crop((40, 48), (32, 38), (0, 1), (32, 32))
    assert crop.mirrored().sizes() == [40, 48, 0, 5, 32, 32] and crop.mirrored().mirrored() == crop


def test_cached_conditioning_equals_uncached_and_rows_stay_paired(tiny_sdxl_dir, instance_dir):
    cfg = make_cfg(tiny_sdxl_dir, instance_dir, "unused", center_crop=False)
    models = M.load_models(cfg)
    images = [im.image for im in data.load_instance_images(instance_dir, 32)]
    images[1] = images[1].resize((32, 64))  # a tall one: its crop moves vertically
    pixels, sizes = data.pixels_and_sizes(images, cfg, torch.Generator().manual_seed(3))
    assert len({tuple(s) for s in sizes}) > 1  # the rows are told apart by their sizes too
    captions = ["a photo of sks dog", "sks dog on grass", "sks dog in snow", "sks dog at the beach"]
    latents = S.cache_latents(models, pixels, seed=0)
    dataset = data.DreamBoothDataset(latents, captions, latents[:1], "a photo of a dog", sizes, [[32, 32, 0, 0, 32, 32]])
    batch = data.collate_examples([dataset[i] for i in (2, 1, 0)], with_prior=True)
    cache = S.cache_text_embeddings(models, captions + ["a photo of a dog"], cfg)
    z, cached = S.latents_and_conditioning(batch, models, cache, True, torch.Generator(), "cpu", cfg)
    _, uncached = S.latents_and_conditioning(batch, models, None, True, torch.Generator(), "cpu", cfg)
    torch.testing.assert_close(cached["encoder_hidden_states"], uncached["encoder_hidden_states"])
    torch.testing.assert_close(cached["added_cond_kwargs"], uncached["added_cond_kwargs"])
    assert batch["prompts"] == [captions[2], captions[1], captions[0]] + ["a photo of a dog"] * 3
    for row, prompt in enumerate(batch["prompts"]):
        item = captions.index(prompt) if row < 3 else None
        assert torch.equal(z[row], latents[item if item is not None else 0])
        want = sizes[item] if item is not None else [32, 32, 0, 0, 32, 32]
        assert cached["added_cond_kwargs"]["time_ids"][row].tolist() == want
        assert torch.equal(cached["added_cond_kwargs"]["text_embeds"][row], cache[prompt]["text_embeds"])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_short_runs_lower_the_loss_on_a_fixed_batch(mode, tiny_sdxl_dir, instance_dir, tmp_path):
    extra = dict(learning_rate=2e-3) if mode == "full" else dict(use_lora=True, lora_rank=8, learning_rate=2e-2)
    cfg = make_cfg(tiny_sdxl_dir, instance_dir, tmp_path, train_text_encoder=True, **extra)
    pixels, sizes = data.pixels_and_sizes([im.image for im in data.load_instance_images(instance_dir, 32)], cfg, None)
    state = T.prepare_training(cfg, M.load_models(cfg), T.make_accelerator(cfg), pixels,
                               ["a photo of sks dog"] * 4, log=lambda _: None, instance_sizes=sizes)
    losses = fixed_batch_losses(state)  # before training, then every second of 8 steps
    # Measured on this tiny model: full 1.12 -> 0.86, LoRA 1.12 -> 1.03, falling at every check.
    assert losses == sorted(losses, reverse=True) and losses[-1] < (0.85 if mode == "full" else 0.95) * losses[0]


def test_lora_run_resumes_exactly_and_loads_in_stock_sdxl_pipeline(tiny_sdxl_dir, instance_dir, tmp_path, monkeypatch):
    common = dict(use_lora=True, train_text_encoder=True, lora_dropout=0.1, train_batch_size=2, max_train_steps=4,
                  checkpointing_steps=2, with_prior_preservation=True, num_class_images=2, class_inference_steps=1,
                  class_dir=str(tmp_path / "class"), learning_rate=1e-2, lr_scheduler="linear", optimizer="adamw8bit")
    whole = T.train(make_cfg(tiny_sdxl_dir, instance_dir, tmp_path / "whole", **common), progress=False)
    assert "AdamW8bit" in whole["optimizer"]
    manifest = json.loads((tmp_path / "class" / CI.MANIFEST_NAME).read_text())
    assert manifest["family"] == "sdxl"
    train_killed_after_checkpoint(monkeypatch, make_cfg(tiny_sdxl_dir, instance_dir, tmp_path / "cut", **common), 2,
                                  progress=False)
    resumed = T.train(make_cfg(tiny_sdxl_dir, instance_dir, tmp_path / "cut", resume="latest", **common), progress=False)
    assert [h["loss"] for h in resumed["loss_history"]] == pytest.approx([h["loss"] for h in whole["loss_history"]], abs=1e-6)
    a, b = load_file(tmp_path / "whole" / W.LORA_WEIGHTS), load_file(tmp_path / "cut" / W.LORA_WEIGHTS)
    assert {k.split(".")[0] for k in a} == {"unet", "text_encoder", "text_encoder_2"} and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)

    # Stock diffusers loads it; scales 0/0/0 give the base model exactly, 1 changes the pictures.
    base = generate(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir), PROMPTS[0], [0], num_inference_steps=2,
                    progress=False)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(tmp_path / "whole", adapter_name="subject")
    assert {c: v for c, v in pipe.get_list_adapters().items()} == {c: ["subject"] for c in ("unet", "text_encoder", "text_encoder_2")}
    tuned = generate(pipe, PROMPTS[0], [0], num_inference_steps=2, progress=False)
    set_lora_scales(pipe, denoiser=0.0, text_encoder=0.0)  # text_encoder_2 follows text_encoder
    off = generate(pipe, PROMPTS[0], [0], num_inference_steps=2, progress=False)
    assert np.array_equal(np.asarray(off[0]), np.asarray(base[0])) and not np.array_equal(np.asarray(tuned[0]), np.asarray(base[0]))
    set_lora_scales(pipe, denoiser=0.0, text_encoder=0.0, text_encoder_2=1.0)  # a separate knob when set
    assert not np.array_equal(np.asarray(generate(pipe, PROMPTS[0], [0], num_inference_steps=2, progress=False)[0]),
                              np.asarray(base[0]))
    # The library's loader, from the run folder and from a checkpoint.
    loaded = generate(load_pipeline(tiny_sdxl_dir, lora_dir=tmp_path / "whole", device="cpu"), PROMPTS[0], [0],
                      num_inference_steps=2, progress=False)
    assert np.array_equal(np.asarray(loaded[0]), np.asarray(tuned[0]))
    assert isinstance(load_pipeline(tmp_path / "whole" / "checkpoint-4", device="cpu"), StableDiffusionXLPipeline)


def test_full_run_saves_a_complete_sdxl_pipeline(tiny_sdxl_dir, instance_dir, tmp_path):
    cfg = make_cfg(tiny_sdxl_dir, instance_dir, tmp_path / "run", train_text_encoder=True, random_flip=True,
                   cache_latents=False, validation_steps=2, mixed_precision="bf16")
    logs = []
    summary = T.train(cfg, progress=False, log=logs.append)
    assert all(np.isfinite(h["loss"]) for h in summary["loss_history"])
    assert any(line.startswith("VAE: the model's own in bfloat16") for line in logs)  # bf16 does not overflow
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "run")
    assert pipe(PROMPTS[0], num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    for part, weights in (("unet", "diffusion_pytorch_model"), ("text_encoder_2", "model")):
        before = load_file(tiny_sdxl_dir / part / f"{weights}.safetensors")
        after = load_file(tmp_path / "run" / part / f"{weights}.safetensors")
        assert any(not torch.equal(before[k], after[k]) for k in before)  # trained and saved
    assert (tmp_path / "run" / "validation" / "step-2.png").is_file()


def test_sdxl_bad_input_fails_before_model_work(tiny_sdxl_dir, tiny_model_dir, instance_dir, tmp_path):
    with pytest.raises(data.InputError, match="resolution = 40: SDXL needs a multiple of 16"):
        T.train(make_cfg(tiny_sdxl_dir, instance_dir, tmp_path / "r", resolution=40), progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.warns(UserWarning, match="madebyollin/sdxl-vae-fp16-fix"):
        families.check(make_cfg(tiny_sdxl_dir, instance_dir, tmp_path, vae_precision="fp16"))
    # A class folder made by an SD model is refused for an SDXL run, naming the family.
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    (class_dir / CI.MANIFEST_NAME).write_text(json.dumps(dict(
        model=str(tiny_sdxl_dir), model_weights=CI.weights_fingerprint(str(tiny_sdxl_dir)), family="sd",
        vae_model=None, class_prompt="a photo of a dog")))
    with pytest.raises(data.InputError, match="family: folder has 'sd', this run wants 'sdxl'"):
        V.validate_config(make_cfg(tiny_sdxl_dir, instance_dir, tmp_path, with_prior_preservation=True,
                                      class_dir=str(class_dir)))
    # A LoRA of one family on the other's base model, either way round.
    sd_cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path, use_lora=True, train_text_encoder=True)
    sd_models = M.load_models(sd_cfg)
    M.add_lora(sd_models.denoiser, sd_models.text_encoders, sd_cfg)
    W.save_weights(tmp_path / "sd_lora", sd_models.denoiser, sd_models.text_encoders, sd_cfg)
    xl_cfg = make_cfg(tiny_sdxl_dir, instance_dir, tmp_path, use_lora=True)
    xl_models = M.load_models(xl_cfg)
    M.add_lora(xl_models.denoiser, xl_models.text_encoders, xl_cfg)
    W.save_weights(tmp_path / "xl_lora", xl_models.denoiser, xl_models.text_encoders, xl_cfg)
    with pytest.raises(data.InputError, match=r"not trained on .*\(sdxl\): its UNet cross-attention takes \[16\]-wide"):
        load_pipeline(tiny_sdxl_dir, lora_dir=tmp_path / "sd_lora", device="cpu")
    with pytest.raises(data.InputError, match=r"\(sd\): its UNet cross-attention takes \[40\]-wide"):
        load_pipeline(tiny_model_dir, lora_dir=tmp_path / "xl_lora", device="cpu")


def test_vae_precision_and_a_separate_vae(tiny_sdxl_dir, instance_dir, tmp_path):
    xl = M.load_models(make_cfg(tiny_sdxl_dir, instance_dir, tmp_path))
    cfg = make_cfg(tiny_sdxl_dir, instance_dir, tmp_path)
    assert M.vae_precision(cfg, families.sdxl, xl.vae, torch.float16)[0] == torch.float32  # force_upcast honoured
    assert M.vae_precision(cfg, families.sdxl, xl.vae, torch.bfloat16)[0] == torch.bfloat16  # bf16 does not overflow
    assert M.vae_precision(cfg, families.sd, xl.vae, torch.float16)[0] == torch.float16  # SD pipelines ignore it
    forced = make_cfg(tiny_sdxl_dir, instance_dir, tmp_path, vae_precision="fp16")
    assert M.vae_precision(forced, families.sdxl, xl.vae, torch.float16)[0] == torch.float16
    # A fixed VAE (force_upcast off) named by vae_model is the one loaded, and runs in fp16.
    fixed = type(xl.vae).from_config({**xl.vae.config, "force_upcast": False})
    fixed.save_pretrained(tmp_path / "fixed_vae")
    cfg = make_cfg(tiny_sdxl_dir, instance_dir, tmp_path / "run", vae_model=str(tmp_path / "fixed_vae"), max_train_steps=1,
                   with_prior_preservation=True, num_class_images=1, class_inference_steps=1)
    models = M.load_models(cfg)
    assert torch.equal(models.vae.encoder.conv_in.weight, fixed.encoder.conv_in.weight)
    assert M.vae_precision(cfg, families.sdxl, models.vae, torch.float16)[0] == torch.float16
    # A full run with it: the class images' manifest names it, and the saved pipeline carries it.
    T.train(cfg, progress=False)
    manifest = json.loads((tmp_path / "run" / "class_images" / CI.MANIFEST_NAME).read_text())
    assert manifest["vae_model"] == str(tmp_path / "fixed_vae") and manifest["family"] == "sdxl"
    saved = StableDiffusionXLPipeline.from_pretrained(tmp_path / "run").vae
    assert saved.config.force_upcast is False and torch.equal(saved.encoder.conv_in.weight, fixed.encoder.conv_in.weight)


def test_sample_cli_scales_and_evaluate_on_an_sdxl_lora(tiny_sdxl_dir, instance_dir, tmp_path):
    from dreambooth_lib import __main__ as cli
    from dreambooth_lib import evaluate
    from dreambooth_lib.tiny import save_tiny_clip, save_tiny_dino

    cfg = make_cfg(tiny_sdxl_dir, instance_dir, tmp_path, use_lora=True, train_text_encoder=True)
    models = M.load_models(cfg)
    M.add_lora(models.denoiser, models.text_encoders, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in (models.denoiser, *models.text_encoders):
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)  # as if trained (gaussian init leaves B = 0)
    W.save_weights(tmp_path / "lora", models.denoiser, models.text_encoders, cfg)

    def grid(name: str, *scales: str) -> np.ndarray:
        argv = ["sample", "--model", str(tiny_sdxl_dir), "--lora_dir", str(tmp_path / "lora"), "--prompt", PROMPTS[0],
                "--seeds", "0", "--num_inference_steps", "2", "--out", str(tmp_path / f"{name}.png"), *scales]
        assert cli.main(argv) == 0
        return np.asarray(Image.open(tmp_path / f"{name}.png"))

    base = np.asarray(generate(load_pipeline(tiny_sdxl_dir, device="cpu"), PROMPTS[0], [0], num_inference_steps=2,
                               progress=False)[0])
    assert np.array_equal(grid("off", "--unet_scale", "0", "--text_encoder_scale", "0"), base)
    second = grid("te2", "--unet_scale", "0", "--text_encoder_scale", "0", "--text_encoder_2_scale", "1")
    first = grid("te1", "--unet_scale", "0", "--text_encoder_scale", "1", "--text_encoder_2_scale", "0")
    assert not np.array_equal(second, base) and not np.array_equal(first, base) and not np.array_equal(first, second)

    out = tmp_path / "eval"
    dino, clip = save_tiny_dino(tmp_path / "dino"), save_tiny_clip(tmp_path / "clip")
    assert evaluate.main(["--model", str(tiny_sdxl_dir), "--lora", str(tmp_path / "lora"), "--subject-dir", str(instance_dir),
                          "--class-noun", "dog", "--identifier", "sks", "--dino", str(dino), "--clip", str(clip),
                          "--out", str(out), "--smoke"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows["overall"]["n_images"] == 4 and all(-1 <= rows["overall"][c] <= 1 for c in ("DINO", "CLIP-I", "CLIP-T", "PRES"))
