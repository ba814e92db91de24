"""train.py on the tiny model: exact resume, atomic checkpoints, 8-bit optimizer, batch pairing, NaN stop."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

import dreambooth_lib.checkpoint as CK
import dreambooth_lib.class_images as CI
import dreambooth_lib.compiled as CO
import dreambooth_lib.disk as DK
import dreambooth_lib.errors as E
import dreambooth_lib.fsio as FS
import dreambooth_lib.models as M
import dreambooth_lib.step as S
import dreambooth_lib.weights as W
import dreambooth_lib.train as T
from dreambooth_lib import data, families, memory
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.sample import load_pipeline
from conftest import train_killed_after_checkpoint


def make_cfg(model, instance_dir, out, **kw) -> TrainConfig:
    base = dict(pretrained_model=str(model), instance_dir=str(instance_dir), output_dir=str(out), class_noun="dog",
                identifier="sks", resolution=32, with_prior_preservation=False, max_train_steps=2,
                learning_rate=1e-3, checkpointing_steps=0, validation_steps=0, num_validation_images=2,
                validation_inference_steps=2)
    return TrainConfig(**{**base, **kw})


def unet_weights(folder) -> dict:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_equals_uninterrupted_run(mode, tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    # full: UNet only, grad accumulation 2; LoRA: UNet + text encoder with dropout (restored global RNG).
    extra = dict(gradient_accumulation_steps=2) if mode == "full" else dict(
        use_lora=True, train_text_encoder=True, lora_dropout=0.1, train_batch_size=2)
    common = dict(max_train_steps=6, checkpointing_steps=3, lr_scheduler="linear", with_prior_preservation=True,
                  num_class_images=2, class_inference_steps=1, class_dir=str(tmp_path / "class"), **extra)
    whole = T.train(make_cfg(tiny_model_dir, instance_dir, tmp_path / "whole", validation_steps=3, **common),
                    progress=False)

    cut = tmp_path / "cut"
    train_killed_after_checkpoint(monkeypatch, make_cfg(tiny_model_dir, instance_dir, cut, **common), 3, progress=False)
    resumed = T.train(make_cfg(tiny_model_dir, instance_dir, cut, resume="latest", **common), progress=False)

    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == whole["steps"] == 6
    assert [h["loss"] for h in resumed["loss_history"]] == pytest.approx([h["loss"] for h in whole["loss_history"]], abs=1e-6)
    if mode == "full":
        a, b = unet_weights(tmp_path / "whole"), unet_weights(cut)
        start = unet_weights(tiny_model_dir)
        assert any(not torch.equal(start[k], a[k]) for k in a)  # training changed the weights
    else:
        a = load_file(tmp_path / "whole" / W.LORA_WEIGHTS)
        b = load_file(cut / W.LORA_WEIGHTS)
        assert any(k.startswith("text_encoder.") for k in a) and any(k.startswith("unet.") for k in a)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert "AdamW8bit" in whole["optimizer"]
    assert Image.open(tmp_path / "whole" / "validation" / "step-6.png").size == (2 * 32, 32)  # 1 prompt x 2 seeds
    # Every checkpoint is usable for inference on its own.
    pipe = load_pipeline(tmp_path / "whole" / "checkpoint-3", device="cpu")
    assert pipe(["a photo of sks dog"], num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


def test_lora_resume_really_reloads_weights(tiny_model_dir, instance_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path / "run", use_lora=True, train_text_encoder=True,
                   max_train_steps=2, checkpointing_steps=2)
    T.train(cfg, progress=False)
    saved = load_file(tmp_path / "run" / "checkpoint-2" / W.LORA_WEIGHTS)
    models = M.load_models(cfg)
    M.add_lora(models.denoiser, models.text_encoders, cfg)
    fresh = {"unet." + k: v.clone() for k, v in W.lora_layers(models.denoiser).items()}
    W.load_weights(tmp_path / "run" / "checkpoint-2", models.denoiser, models.text_encoders, cfg)
    now = {"unet." + k: v for k, v in W.lora_layers(models.denoiser).items()}
    now |= {"text_encoder." + k: v for k, v in W.lora_layers(models.text_encoders[0]).items()}
    assert now.keys() == saved.keys()
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    assert any(not torch.equal(fresh[k], saved[k]) for k in fresh)  # so the load did change something
    # A checkpoint from another LoRA shape is refused, not silently half-loaded.
    other = make_cfg(tiny_model_dir, instance_dir, tmp_path, use_lora=True, lora_rank=2)
    m2 = M.load_models(other)
    M.add_lora(m2.denoiser, m2.text_encoders, other)
    with pytest.raises(data.InputError, match="lora_rank"):
        W.load_weights(tmp_path / "run" / "checkpoint-2", m2.denoiser, m2.text_encoders, other)


def test_checkpoints_are_atomic_and_pruned(tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, instance_dir, out, checkpoints_total_limit=2)
    models = M.load_models(cfg)
    opt = torch.optim.AdamW(models.denoiser.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (1, 2, 3):
        CK.save_checkpoint(out, step, models.denoiser, models.text_encoders, opt, sched, [], cfg)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # no .tmp-* left

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(CK, "save_training_state", crash)
    with pytest.raises(OSError):
        CK.save_checkpoint(out, 4, models.denoiser, models.text_encoders, opt, sched, [], cfg)
    assert not (out / "checkpoint-4").exists()
    assert (out / "checkpoint-2").exists()  # pruning happens only after a successful save
    assert CK.latest_checkpoint(out) == out / "checkpoint-3"  # a half-written .tmp-checkpoint-4 never counts


def record_fsyncs_and_renames(monkeypatch) -> list[tuple[str, str]]:
    """[("fsync", path) | ("replace", "src -> dst")] in the order the library made them (Linux /proc)."""
    import os
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", f"{src} -> {dst}"))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fd paths from /proc (Linux)")
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_checkpoints_and_final_weights_are_fsynced_before_and_after_the_rename(mode, tiny_model_dir, instance_dir,
                                                                             tmp_path, monkeypatch):
    out = tmp_path / "run"
    kw = dict(use_lora=True, train_text_encoder=True) if mode == "lora" else dict(train_text_encoder=True)
    cfg = make_cfg(tiny_model_dir, instance_dir, out, optimizer="adamw", **kw)
    models = M.load_models(cfg)
    if cfg.use_lora:
        M.add_lora(models.denoiser, models.text_encoders, cfg)
    opt = torch.optim.AdamW([p for p in models.denoiser.parameters() if p.requires_grad])
    opt.zero_grad()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    events = record_fsyncs_and_renames(monkeypatch)
    final = CK.save_checkpoint(out, 5, models.denoiser, models.text_encoders, opt, sched, [{"step": 5, "loss": 0.5}], cfg)

    tmp = out / ".tmp-checkpoint-5"
    rename = events.index(("replace", f"{tmp} -> {final}"))
    before = {path for kind, path in events[:rename] if kind == "fsync"}
    written = {str(tmp / p.relative_to(final)) for p in final.rglob("*")}
    assert written and written <= before  # every file and subfolder, flushed under its temporary name
    assert str(tmp) in before  # the folder's own entries
    assert ("fsync", str(out)) in events[rename + 1:]  # the rename itself
    # Read back: nothing empty, and the checkpoint holds what was saved.
    assert all(p.stat().st_size > 0 for p in final.rglob("*") if p.is_file())
    assert CK.load_training_state(final, opt, sched) == (5, [{"step": 5, "loss": 0.5}])
    if cfg.use_lora:
        saved = load_file(final / W.LORA_WEIGHTS)
        assert all(torch.equal(v, saved["unet." + k]) for k, v in W.lora_layers(models.denoiser).items())
    else:
        saved = unet_weights(final)
        assert all(torch.equal(v, saved[k]) for k, v in models.denoiser.state_dict().items())

    # Final weights: flushed, then renamed into place (LoRA) or flushed where written (full pipeline).
    events.clear()
    weights = CK.save_final(out, models.denoiser, models.text_encoders, cfg)
    flushed = {path for kind, path in events if kind == "fsync"}
    if cfg.use_lora:
        assert events[-2:] == [("replace", f"{out / '.tmp-final' / W.LORA_WEIGHTS} -> {weights}"), ("fsync", str(out))]
        assert str(out / ".tmp-final" / W.LORA_WEIGHTS) in flushed and not (out / ".tmp-final").exists()
    else:
        files = [p for name in ("unet", "text_encoder", "vae") for p in (out / name).rglob("*")]
        assert files and {str(p) for p in files} <= flushed and str(out / "model_index.json") in flushed
    FS.write_text_durably(out / "summary.json", '{"steps": 5}')
    assert events[-2:] == [("replace", f"{out / '.tmp-summary.json'} -> {out / 'summary.json'}"), ("fsync", str(out))]
    assert (out / "summary.json").read_text() == '{"steps": 5}'


def test_optimizer_is_8bit_or_falls_back_with_a_note(monkeypatch):
    import bitsandbytes as bnb
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-3}]
    assert isinstance(M.make_optimizer(params, TrainConfig(optimizer="adamw8bit")), bnb.optim.AdamW8bit)
    notes = []
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails
    opt = M.make_optimizer(params, TrainConfig(optimizer="adamw8bit"), log=notes.append)
    assert type(opt) is torch.optim.AdamW and "torch.optim.AdamW" in notes[0]



def test_batch_indices_deal_seeded_epoch_permutations():
    steps = [S.batch_indices(6, 2, seed=0, micro_step=s) for s in range(3)]
    assert sorted(sum(steps, [])) == list(range(6))  # one epoch = a permutation
    assert S.batch_indices(6, 2, 0, 4) == S.batch_indices(6, 2, 0, 4)  # pure: resume sees the same data
    ranks = [S.batch_indices(6, 1, 0, 0, rank=r, world=2) + S.batch_indices(6, 1, 0, 1, rank=r, world=2) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(steps[0] + steps[1])  # 2 processes share the same stream


def test_prompts_stay_paired_with_latents(tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    for i, photo in enumerate(sorted(instance_dir.glob("photo*"))):
        photo.with_suffix(".txt").write_text(["a photo of sks dog", "sks dog on grass", "sks dog in snow",
                                              "sks dog at the beach"][i])
    cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path / "run", use_captions=True, with_prior_preservation=True,
                   num_class_images=2, class_inference_steps=1, train_batch_size=2, train_text_encoder=True,
                   max_train_steps=2)
    seen = []
    real_encode = S.encode_prompts
    monkeypatch.setattr(S, "encode_prompts", lambda models, prompts, *rest: seen.append(list(prompts)) or real_encode(models, prompts, *rest))
    T.train(cfg, progress=False)
    captions = data.instance_prompts_for(data.load_instance_images(instance_dir, 32, True), cfg, "sks")
    expected = [[captions[i] for i in S.batch_indices(4, 2, cfg.seed, s)] + ["a photo of a dog"] * 2 for s in range(2)]
    assert seen == expected

    # The cached path: row i of (latents, text embeddings) both belong to prompts[i].
    models = M.load_models(cfg)
    pixels = data.pixel_values([im.image for im in data.load_instance_images(instance_dir, 32, True)], cfg, None)
    latents = S.cache_latents(models, pixels, seed=0)
    dataset = data.DreamBoothDataset(latents, captions, latents[:1], "a photo of a dog")
    cache = S.cache_text_embeddings(models, captions + ["a photo of a dog"], cfg)
    batch = data.collate_examples([dataset[i] for i in (2, 0)], with_prior=True)
    z, c = S.latents_and_conditioning(batch, models, cache, True, torch.Generator(), "cpu", cfg)
    assert batch["prompts"] == [captions[2], captions[0], "a photo of a dog", "a photo of a dog"]
    for row, prompt in enumerate(batch["prompts"]):
        image = captions.index(prompt) if prompt in captions else 0
        assert torch.equal(z[row], latents[image])
        assert torch.equal(c[row], cache[prompt])


def test_nan_loss_stops_with_advice_and_saves_nothing(tiny_model_dir, instance_dir, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    pipe.save_pretrained(tmp_path / "nan_model")
    cfg = make_cfg(tmp_path / "nan_model", instance_dir, tmp_path / "run", checkpointing_steps=1)
    with pytest.raises(E.TrainingDiverged, match="lower learning_rate") as err:
        T.train(cfg, progress=False)
    assert "step 1" in str(err.value)
    assert not list((tmp_path / "run").glob("*checkpoint*"))
    assert not (tmp_path / "run" / "summary.json").exists()


def test_full_run_writes_a_loadable_pipeline_and_summary(tiny_model_dir, instance_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path / "run", train_text_encoder=True, optimizer="adamw",
                   random_flip=True, cache_latents=False, max_train_steps=2)
    summary = T.train(cfg, progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run")
    assert pipe(["a photo of sks dog"], num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    assert summary["optimizer"] == "torch.optim.adamw.AdamW"
    assert summary["memory_plan"]["gradient_checkpointing"] is False and "not a CUDA device" in summary["memory_plan"]["reason"]
    assert len(summary["loss_history"]) == 2 and summary["final_loss"] == summary["loss_history"][-1]["loss"]
    assert summary["instance_prompts"] == ["a photo of sks dog"] * 4 and summary["peak_memory_mb"] > 0
    base_te = load_file(tiny_model_dir / "text_encoder" / "model.safetensors")
    new_te = load_file(tmp_path / "run" / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(base_te[k], new_te[k]) for k in base_te)  # the text encoder was trained

    # save_precision fp16: the same pipeline at half the size, every tensor the fp32 one rounded to fp16
    CK.save_final(tmp_path / "half", pipe.unet, pipe.text_encoder, dataclasses.replace(cfg, save_precision="fp16"))
    for part, name in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model"), ("vae", "diffusion_pytorch_model")]:
        full, half = (load_file(root / part / f"{name}.safetensors") for root in (tmp_path / "run", tmp_path / "half"))
        assert full.keys() == half.keys() and all(half[k].dtype == torch.float16 for k in half), part
        assert all(torch.equal(half[k], full[k].half()) for k in full), part


def prepared(cfg, models=None):
    """prepare_training on the tiny model with the instance photos, as train() calls it."""
    images = data.load_instance_images(cfg.instance_dir, cfg.resolution)
    values = data.pixel_values([im.image for im in images], cfg, torch.Generator().manual_seed(0))
    return T.prepare_training(cfg, models or M.load_models(cfg), T.make_accelerator(cfg), values,
                              ["a photo of sks dog"] * len(values), log=lambda _: None)


def test_train_step_syncs_once_per_optimizer_step_and_stops_before_a_nan_update(tiny_model_dir, instance_dir, tmp_path,
                                                                                  monkeypatch):
    cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path, gradient_accumulation_steps=3, optimizer="adamw")
    state = prepared(cfg)
    reads = []  # host reads of tensor values made by the library's own code (torch's CPU AdamW makes some)

    def spy(name):
        real = getattr(torch.Tensor, name)

        def read(t):
            if "dreambooth_lib" in sys._getframe(1).f_code.co_filename:
                reads.append((name, tuple(t.shape)))
            return real(t)
        monkeypatch.setattr(torch.Tensor, name, read)

    spy("tolist"), spy("item"), spy("__float__")
    record = S.train_step(state, 0)
    assert reads == [("tolist", (3,))]  # one read of (loss, instance, prior) for 3 micro-steps
    assert record["step"] == 1 and record["prior_loss"] == 0.0 and record["loss"] == pytest.approx(record["instance_loss"])
    monkeypatch.undo()

    # NaN in the second of 3 micro-steps: found before the optimizer step, weights untouched.
    before = [p.detach().clone() for p in state.params]
    real_loss = S.diffusion_loss
    calls = []

    def nan_second(*a, **k):
        calls.append(1)
        loss, parts = real_loss(*a, **k)
        return (loss * float("nan"), parts) if len(calls) == 2 else (loss, parts)

    monkeypatch.setattr(S, "diffusion_loss", nan_second)
    with pytest.raises(E.TrainingDiverged, match="step 2"):
        S.train_step(state, 1)
    assert len(calls) == 3 and all(torch.equal(a, b) for a, b in zip(before, state.params))


def test_prepare_training_takes_in_memory_models_and_compiles_the_unet(tiny_model_dir, instance_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path, use_lora=True, compile="unet", compile_check=False)
    models = M.load_models(cfg)
    models.denoiser.requires_grad_(True)  # whatever state they come in, LoRA trains only its adapters
    state = prepared(cfg, models)
    assert isinstance(state.denoiser, torch._dynamo.eval_frame.OptimizedModule) and state.denoiser._orig_mod is state.trained[0]
    # "blocks": each transformer block compiled in place (regional compilation); the UNet itself stays eager
    blocks = prepared(make_cfg(tiny_model_dir, instance_dir, tmp_path, use_lora=True, compile="blocks",
                               compile_check=False)).models.denoiser
    compiled = [type(m).__name__ for m in blocks.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled and set(compiled) == {"BasicTransformerBlock"}
    assert state.trained[0] is models.denoiser and all("lora" in n for n, p in models.denoiser.named_parameters() if p.requires_grad)
    assert {p.dtype for p in state.params} == {torch.float32} and len(state.dataset) == 4 and state.text_cache
    # train() trains given models (in place) instead of loading its own.
    run_cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path / "run", use_lora=True, max_train_steps=1)
    given = M.load_models(run_cfg)
    summary = T.train(run_cfg, progress=False, models=given)
    assert summary["steps"] == 1 and summary["seconds_per_step"] is None  # the only step was the warm-up one
    saved = load_file(tmp_path / "run" / W.LORA_WEIGHTS)
    assert all(torch.equal(v, saved["unet." + k]) for k, v in W.lora_layers(given.denoiser).items())


def test_saved_lora_loads_with_its_alpha(tiny_model_dir, instance_dir, tmp_path):
    # lora_alpha != rank: the file's metadata must carry the scale alpha / r = 2 to load_lora_weights.
    cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path / "run", use_lora=True, train_text_encoder=True, lora_rank=4,
                   lora_alpha=8, max_train_steps=2, optimizer="adamw")
    trained = M.load_models(cfg)
    T.train(cfg, progress=False, models=trained)
    pipe = load_pipeline(tiny_model_dir, lora_dir=tmp_path / "run", device="cpu")
    assert {m.scaling["subject"] for m in pipe.unet.modules() if hasattr(m, "scaling")} == {2.0}
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids
    trained.denoiser.eval(), trained.text_encoders[0].eval()
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        torch.testing.assert_close(hidden, trained.text_encoders[0](ids)[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(pipe.unet(x, t, hidden).sample, trained.denoiser(x, t, hidden).sample, atol=1e-6, rtol=0)


def test_seconds_per_step_excludes_the_first_step_and_checkpoints(tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    import time

    real_step, real_save = S.train_step, CK.save_checkpoint
    real_seconds = []  # what the library's step itself took, measured here (load-independent comparison)

    def slow_first_step(state, step):
        if step == 0:
            time.sleep(0.5)
        t0 = time.perf_counter()
        record = real_step(state, step)
        real_seconds.append(time.perf_counter() - t0)
        return record

    monkeypatch.setattr(T, "train_step", slow_first_step)
    monkeypatch.setattr(T, "save_checkpoint", lambda *a, **k: time.sleep(0.5) or real_save(*a, **k))
    real_cache, real_final = S.cache_text_embeddings, CK.save_final
    monkeypatch.setattr(T, "cache_text_embeddings", lambda *a: time.sleep(0.3) or real_cache(*a))
    monkeypatch.setattr(T, "save_final", lambda *a: time.sleep(0.3) or real_final(*a))
    cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path, max_train_steps=3, checkpointing_steps=1)
    summary = T.train(cfg, progress=False)
    # The phases (bench_e2e.py reports them) add up to the wall time, each sleep in its own phase.
    phases = summary["phase_s"]
    assert list(phases) == ["data", "class_images", "load", "setup", "cache", "train", "save"]
    assert phases["train"] > 2.0 and 0.3 < phases["cache"] < 1.0 and 0.3 < phases["save"] and phases["setup"] >= 0
    assert sum(phases.values()) - phases["save"] == pytest.approx(summary["wall_time_s"], abs=0.05)
    assert json.loads((tmp_path / "summary.json").read_text())["phase_s"]["save"] == phases["save"]
    # Steps 2-3 only: with step 1 (+0.17 s) or the checkpoints (+0.5 s) it would be far above their own time.
    assert summary["wall_time_s"] > 2.0
    assert summary["seconds_per_step"] == pytest.approx(sum(real_seconds[1:]) / 2, abs=0.02)
    assert summary["peak_memory_reserved_mb"] is None  # CPU: only the process peak RSS


def test_finished_or_train_reuses_a_finished_run_and_trains_otherwise(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text('{"steps": 7}')
    # A finished run is returned as saved: nothing is validated, loaded or trained.
    assert T.finished_or_train(TrainConfig(output_dir=str(done), instance_dir="/no/such/folder")) == {"steps": 7}
    # Without one it trains, so bad input fails exactly as train() would.
    with pytest.raises(data.InputError, match="/no/such/folder"):
        T.finished_or_train(TrainConfig(output_dir=str(tmp_path / "new"), instance_dir="/no/such/folder", class_noun="dog"))


# --- speed levers: each gives the eager / reference numbers ------------------------------------------

def steps_of(cfg, n=3):
    """Losses, the first step's gradients and the trained weights after n train_steps."""
    state = prepared(cfg)
    grads, real_step = [], state.optimizer.step
    state.optimizer.step = lambda *a, **k: grads.append([p.grad.clone() for p in state.params]) or real_step(*a, **k)
    losses = [S.train_step(state, s)["loss"] for s in range(n)]
    return losses, grads[0], [p.detach().clone() for p in state.params], state


def assert_same_step(a, b, rtol=1e-5):
    """Same losses and first-step gradients (relative to the largest); weights within 1e-4 after 3 steps
    of lr 1e-3 (Adam's normalised update turns rounding in a near-zero gradient into moves up to lr)."""
    (loss_a, grads_a, w_a, _), (loss_b, grads_b, w_b, _) = a, b
    assert loss_b == pytest.approx(loss_a, rel=rtol)
    scale = max(g.abs().max().item() for g in grads_a)
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(y, x, rtol=rtol, atol=rtol * scale)
    moved = sum((x - y).abs().gt(1e-4).sum().item() for x, y in zip(w_a, w_b))
    assert moved <= 2, moved


def test_channels_last_gives_the_same_losses_and_gradients(tiny_model_dir, instance_dir, tmp_path):
    common = dict(optimizer="adamw", use_lora=False)
    plain = steps_of(make_cfg(tiny_model_dir, instance_dir, tmp_path, channels_last=False, **common))
    nhwc = steps_of(make_cfg(tiny_model_dir, instance_dir, tmp_path, channels_last=True, **common))
    conv = nhwc[-1].models.denoiser.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain[-1].models.denoiser.conv_in.weight.is_contiguous()
    assert memory.use_channels_last("auto", "cpu") is False and memory.use_channels_last("auto", "cuda") is True
    assert_same_step(plain, nhwc)  # fp32 on the CPU: only the summation order of convolutions differs


def test_fused_adamw_matches_the_per_tensor_loop_in_one_op_per_step():
    from torch.profiler import profile

    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (4, 4, 3, 3)] * 10  # 30 tensors
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    cfg = TrainConfig(optimizer="adamw", learning_rate=1e-2)

    def run(make):
        params = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
        opt = make([{"params": params, "lr": cfg.learning_rate}])
        ops = []
        for i, g in enumerate(grads):
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            with profile() as prof:
                opt.step()
            if i:  # steps after the first (which creates the states): ops the step dispatches itself
                ops += [e.name for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.name.startswith("Optimizer.step")]
        return params, ops, opt

    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    ref, ref_ops, _ = run(lambda groups: torch.optim.AdamW(groups, foreach=False, fused=False, **kw))
    ours, our_ops, opt = run(lambda groups: M.make_optimizer(groups, cfg))
    assert opt.defaults["fused"] is True
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # the per-tensor loop: >= 5 ops per tensor per step; fused: 2 per step (step counters, the update), whatever the count
    assert len(ref_ops) >= 5 * len(shapes) * 2 and sorted(our_ops) == ["aten::_foreach_add_", "aten::_fused_adamw_"] * 2 or \
        sorted(our_ops) == sorted(["aten::_foreach_add_", "aten::_fused_adamw_"] * 2), (len(ref_ops), our_ops)


def test_memory_plan_resolves_auto_from_the_free_cuda_memory(tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path, mixed_precision="no")
    models = M.load_models(cfg)
    cpu = M.memory_plan(cfg, models, "cpu")
    assert (cpu.optimizer, cpu.gradient_checkpointing) == ("adamw8bit", False)  # as before "auto" existed
    for free, expected in [(80e9, ("adamw", False)), (1e3, ("adamw8bit", True))]:  # no CUDA here: free memory is given
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80e9))
        plan = M.memory_plan(cfg, models, "cuda")
        assert (plan.optimizer, plan.gradient_checkpointing) == expected, plan.reason
    # on CUDA the frozen text encoders leave the GPU once their prompts are cached: not counted
    kept = (models.denoiser, *(models.text_encoders if cfg.train_text_encoder else ()), models.vae)
    weights = sum(p.numel() * 4 for m in kept for p in m.parameters())
    grads_states = sum(p.numel() for p in models.denoiser.parameters()) * (4 + 2)  # fp32 grads + 8-bit states, no autocast copy
    acts = memory.activation_bytes(models.denoiser.config, 1, 32, 4, True, vae_factor=2)
    assert plan.estimated_peak_gb == pytest.approx((weights + grads_states + acts) / 1e9, rel=1e-3)
    assert "NOTHING FITS" in plan.reason


def test_class_images_regenerate_when_the_sampler_or_dtype_changes(tiny_model_dir, instance_dir, tmp_path):
    import json
    import shutil

    model = tmp_path / "pndm_model"  # SD1.5's own sampler is PNDM
    shutil.copytree(tiny_model_dir, model)
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
         "beta_start": 0.00085, "beta_end": 0.012, "skip_prk_steps": True, "steps_offset": 1}))
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps(index | {"scheduler": ["diffusers", "PNDMScheduler"]}))
    out = tmp_path / "run"

    def made(**kw):
        cfg = make_cfg(model, instance_dir, out, with_prior_preservation=True, num_class_images=2, class_inference_steps=2, **kw)
        paths = CI.class_image_paths(cfg, "a photo of a dog", log=lambda _: None)
        return json.loads((paths[0].parent / "manifest.json").read_text())

    assert families.with_family_defaults(TrainConfig()).class_sampler == "dpmsolver++" and TrainConfig().class_inference_steps == 25
    first = made(class_sampler="model")
    assert (first["scheduler"], first["dtype"], first["num_inference_steps"]) == ("PNDMScheduler", "float32", 2)
    second = made()
    assert second["scheduler"] == "DPMSolverMultistepScheduler(dpmsolver++)" and (out / "class_images.replaced-1").is_dir()
    assert made()["dtype"] == "float32" and not (out / "class_images.replaced-2").exists()  # same settings: reused
    assert made(prior_generation_precision="bf16")["dtype"] == "bfloat16" and (out / "class_images.replaced-2").is_dir()


def test_compiled_step_resumes_an_eager_run_exactly(tiny_model_dir, instance_dir, tmp_path):
    # compile="step" with backend "aot_eager": dynamo + AOTAutograd capture the same forward and backward
    # graphs inductor would get and run them without generating kernels (inductor: minutes on this CPU).
    # One compile covers both claims: the compiled steps 3-4, resumed from the eager run's checkpoint-2,
    # give the eager run's losses and weights (draws come from (seed, step), outside the compiled region).
    common = dict(optimizer="adamw", max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear",
                  with_prior_preservation=True, num_class_images=2, class_inference_steps=1,
                  class_dir=str(tmp_path / "class"))
    eager = T.train(make_cfg(tiny_model_dir, instance_dir, tmp_path / "eager", **common), progress=False)
    resumed_cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path / "compiled", resume=str(tmp_path / "eager" / "checkpoint-2"),
                           compile="step", compile_backend="aot_eager", **common)
    compiled = T.train(resumed_cfg, progress=False)
    assert compiled["resumed_from"].endswith("checkpoint-2") and compiled["config"]["compile"] == "step"
    assert [h["loss"] for h in compiled["loss_history"]] == pytest.approx([h["loss"] for h in eager["loss_history"]], abs=1e-6)
    a, b = unet_weights(tmp_path / "eager"), unet_weights(tmp_path / "compiled")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


def test_compile_check_stops_a_compiled_step_whose_gradients_differ(tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    # torch 2.13's inductor (CPU, channels-last activations) zeroed every gradient below the UNet's upsamplers
    # while the loss stayed exact (benchmarks/README.md). A backend with the same kind of bug: its backward
    # returns zeros for the first gradient. prepare_training must refuse it before anything is trained.
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def zeroing_backward(gm, example_inputs):
        def run(args):
            grads = list(gm(*args))
            first = next(i for i, g in enumerate(grads) if g is not None)
            grads[first] = torch.zeros_like(grads[first])
            return grads
        run._boxed_call = True
        return run

    buggy = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=zeroing_backward)
    monkeypatch.setattr(CO, "compile_options", lambda cfg, device: {"backend": buggy})
    cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path, compile="blocks", optimizer="adamw")  # blocks: traced fastest
    with pytest.raises(E.CompiledStepMismatch, match=r"gradient norms of \d+ of 208 tensors differ.*Nothing was trained.*compile='off'"):
        prepared(cfg)
    monkeypatch.undo()
    # The CPU workaround: inductor without its layout optimization (mode options kept); CUDA and other backends as asked.
    fast = dataclasses.replace(cfg, compile_mode="reduce-overhead")
    assert CO.compile_options(fast, "cpu") == {"backend": "inductor", "options": {"triton.cudagraphs": True,
                                                                                 "layout_optimization": False}}
    assert CO.compile_options(fast, "cuda") == {"backend": "inductor", "mode": "reduce-overhead"}
    assert CO.compile_options(dataclasses.replace(cfg, compile_backend="aot_eager"), "cpu") == {"backend": "aot_eager"}


def test_frozen_parts_load_straight_in_the_mixed_precision_dtype(tiny_model_dir, instance_dir, tmp_path):
    fp32 = M.load_models(make_cfg(tiny_model_dir, instance_dir, tmp_path))
    lora = M.load_models(make_cfg(tiny_model_dir, instance_dir, tmp_path, use_lora=True, mixed_precision="bf16"))
    full = M.load_models(make_cfg(tiny_model_dir, instance_dir, tmp_path, mixed_precision="bf16"))
    full_te = M.load_models(make_cfg(tiny_model_dir, instance_dir, tmp_path, mixed_precision="bf16", train_text_encoder=True))
    dtype = lambda m: next(m.parameters()).dtype  # noqa: E731
    assert [dtype(m) for m in (lora.denoiser, lora.text_encoders[0], lora.vae)] == [torch.bfloat16, torch.bfloat16, torch.float32]
    assert [dtype(m) for m in (full.denoiser, full.text_encoders[0])] == [torch.float32, torch.bfloat16]  # the trained UNet: fp32
    assert dtype(full_te.text_encoders[0]) == torch.float32
    # the same values as loading in fp32 and casting, as prepare_training did before
    for a, b in [(fp32.denoiser, lora.denoiser), (fp32.text_encoders[0], lora.text_encoders[0])]:
        assert all(torch.equal(x.to(torch.bfloat16), y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- a bad day: a full disk, a damaged checkpoint -------------------------------------------------

def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_disk_estimate_is_within_15_percent_of_what_is_written(mode, tiny_model_dir, instance_dir, tmp_path):
    kw = dict(use_lora=True, train_text_encoder=True) if mode == "lora" else dict(train_text_encoder=True)
    out = tmp_path / "run"
    summary = T.train(make_cfg(tiny_model_dir, instance_dir, out, checkpointing_steps=2, **kw), progress=False)
    disk = summary["disk"]
    final = folder_bytes(out / W.LORA_WEIGHTS) if mode == "lora" else sum(
        folder_bytes(out / name) for name in ("unet", "text_encoder", "vae", "tokenizer", "scheduler", "model_index.json"))
    assert disk["checkpoint_bytes"] == pytest.approx(folder_bytes(out / "checkpoint-2"), rel=0.15)
    assert disk["final_bytes"] == pytest.approx(final, rel=0.15)
    early = DK.early_disk_check(make_cfg(tiny_model_dir, instance_dir, tmp_path / "new", checkpointing_steps=2, **kw))
    if mode == "full":  # before models load, from the base model's headers
        assert early["checkpoint_bytes"] == pytest.approx(folder_bytes(out / "checkpoint-2"), rel=0.15)
        assert early["final_bytes"] == pytest.approx(final, rel=0.15)
    else:
        assert early is None
    assert disk["free_bytes"] > 0 and disk["needed_bytes"] == disk["checkpoint_bytes"] + disk["final_bytes"]


@pytest.mark.parametrize("name", ["adamw8bit", "adamw"])
def test_optimizer_state_estimate_matches_the_saved_state(name, tmp_path):
    # 8-bit AdamW: tensors of >= 4096 values keep 1-byte states + block scales, smaller ones fp32 states.
    params = [torch.nn.Parameter(torch.randn(100, 100)), torch.nn.Parameter(torch.randn(300)),
              torch.nn.Parameter(torch.randn(64, 80))]
    cfg = TrainConfig(optimizer=name)
    opt = M.make_optimizer([{"params": params, "lr": 1e-3}], cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    estimate = DK.optimizer_state_bytes(opt)  # before the first step creates the state
    (tmp_path / "before").mkdir(), (tmp_path / "after").mkdir()
    CK.save_training_state(tmp_path / "before", 0, opt, sched, [], cfg)
    sum(p.sum() for p in params).backward()
    opt.step()
    CK.save_training_state(tmp_path / "after", 1, opt, sched, [], cfg)
    grown = folder_bytes(tmp_path / "after") - folder_bytes(tmp_path / "before")
    assert estimate == pytest.approx(grown, rel=0.1)
    fp32 = 2 * 4 * sum(p.numel() for p in params)
    assert (estimate < fp32 / 2) == (name == "adamw8bit")  # so the 8-bit case was really measured as 8-bit


def test_disk_space_check_counts_kept_checkpoints(tmp_path):
    # A checkpoint of 100 bytes, final weights of 50, 4 checkpoints to write (steps 1-4).
    logs = []
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2)
    check = lambda free, start=0, **kw: DK.check_disk_space(dataclasses.replace(cfg, **kw), 100, 50, start,  # noqa: E731
                                                         logs.append, free=free)
    with pytest.raises(data.InputError) as err:
        check(149)  # the first checkpoint + the final weights: 150
    message = str(err.value)
    assert str(tmp_path / "run") in message and "150 bytes" in message and "149 bytes is free" in message
    assert all(hint in message for hint in ("free space", "output_dir", "use_lora=True", "checkpointing_steps=0"))
    # Fits at first, not when 2 are kept + 1 written (3 x 100) or 2 kept + the final (250): a warning.
    assert check(150)["needed_bytes"] == 300 and "Write fewer checkpoints" in logs[-1] and "300 bytes" in logs[-1]
    check(200)
    assert "checkpoints_total_limit=1" in logs[-1]  # 1 kept: 2 x 100 while writing, 100 + 50 at the end
    n = len(logs)
    assert check(300)["needed_bytes"] == 300 and len(logs) == n  # everything fits: no warning
    assert check(1000, checkpoints_total_limit=None)["needed_bytes"] == 4 * 100 + 50
    assert check(50, checkpointing_steps=0)["needed_bytes"] == 50  # no checkpoints: the final weights only
    # Resumed at step 2 with 2 checkpoints on disk: the next write needs one more, pruning frees the oldest.
    for step in (1, 2):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "run" / f"checkpoint-{step}" / CK.STATE_JSON).write_text("{}")
    assert check(100, start=2)["needed_bytes"] == 100


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_full_disk_is_refused_before_the_first_step(mode, tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    # A full fine-tune is refused before class images are made or models load (from the base model's
    # headers); a LoRA run once its adapters and optimizer exist, before the first step.
    monkeypatch.setattr(T, "train_step", lambda *a: pytest.fail("trained on a full disk"))
    if mode == "full":
        monkeypatch.setattr(T, "class_image_paths", lambda *a, **k: pytest.fail("made class images on a full disk"))
        monkeypatch.setattr(T, "load_models", lambda *a: pytest.fail("loaded models for a full disk"))
    monkeypatch.setattr(DK.shutil, "disk_usage", lambda path: types.SimpleNamespace(total=10**12, free=10**4))
    cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path / "run", checkpointing_steps=1, use_lora=mode == "lora",
                   with_prior_preservation=mode == "full", num_class_images=2)
    with pytest.raises(data.InputError, match="not enough disk space in output_dir") as err:
        T.train(cfg, progress=False)
    assert "10.0 kB is free" in str(err.value) and ("use_lora=True" in str(err.value)) == (mode == "full")
    assert not list((tmp_path / "run").glob("*checkpoint*")) and not (tmp_path / "run" / "summary.json").exists()


def small_run(tiny_model_dir, instance_dir, out, **kw) -> TrainConfig:
    """A LoRA run of 3 steps that keeps a checkpoint of every step."""
    return make_cfg(tiny_model_dir, instance_dir, out, **{**dict(use_lora=True, optimizer="adamw", max_train_steps=3,
                    checkpointing_steps=1, checkpoints_total_limit=None), **kw})


def test_a_disk_that_fills_up_mid_save_loses_nothing_and_says_how_to_resume(tiny_model_dir, instance_dir, tmp_path,
                                                                            monkeypatch):
    import errno
    out = tmp_path / "run"
    cfg = small_run(tiny_model_dir, instance_dir, out)
    real_state = CK.save_training_state

    def fill_up(folder, step, *a, **k):  # writes the real files, then the disk is full (mid-checkpoint)
        real_state(folder, step, *a, **k)
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / CK.STATE_JSON))

    monkeypatch.setattr(CK, "save_training_state", fill_up)
    with pytest.raises(E.SaveFailed) as err:
        T.train(cfg, progress=False)
    message = str(err.value)
    assert f"checkpoint-2 {out / '.tmp-checkpoint-2'}" in message and "No space left on device (ENOSPC)" in message
    assert f"{out / 'checkpoint-1'} is intact" in message and "resume='latest'" in message and "--resume latest" in message
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]  # no .tmp-checkpoint-2
    monkeypatch.undo()
    # The intact checkpoint resumes: the run ends as an uninterrupted one would.
    resumed = T.train(dataclasses.replace(cfg, resume="latest"), progress=False)
    assert resumed["resumed_from"] == str(out / "checkpoint-1") and resumed["steps"] == 3

    # The final LoRA file: its temp folder goes too, the message names the file and the last checkpoint.
    monkeypatch.setattr(CK, "publish", lambda tmp, final: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
    models = M.load_models(cfg)
    M.add_lora(models.denoiser, models.text_encoders, cfg)
    with pytest.raises(E.SaveFailed, match="Disk quota exceeded") as err:
        CK.save_final(out, models.denoiser, models.text_encoders, cfg)
    assert str(out / W.LORA_WEIGHTS) in str(err.value) and f"{out / 'checkpoint-3'} is intact" in str(err.value)
    assert not (out / ".tmp-final").exists()


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGXFSZ"), reason="RLIMIT_FSIZE (POSIX)")
def test_the_real_writers_failing_give_the_same_clear_error(tiny_model_dir, instance_dir, tmp_path):
    # No monkeypatch: a file-size limit makes safetensors' own writer fail (its error is no OSError).
    import resource
    import signal
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, instance_dir, out, checkpoints_total_limit=None)
    models = M.load_models(cfg)
    opt = torch.optim.AdamW(models.denoiser.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    CK.save_checkpoint(out, 1, models.denoiser, models.text_encoders, opt, sched, [], cfg)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))  # the tiny UNet's weights are ~230 kB
    try:
        with pytest.raises(E.SaveFailed) as err:
            CK.save_checkpoint(out, 2, models.denoiser, models.text_encoders, opt, sched, [], cfg)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert "File too large (EFBIG)" in str(err.value) and f"{out / 'checkpoint-1'} is intact" in str(err.value)
    assert isinstance(err.value.__cause__, SafetensorError)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_damaged_checkpoint_is_named_with_the_one_to_resume_instead(mode, tiny_model_dir, instance_dir, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "run"
    cfg = small_run(tiny_model_dir, instance_dir, out, max_train_steps=2, use_lora=mode == "lora")
    T.train(cfg, progress=False)
    latest = dataclasses.replace(cfg, resume="latest")
    weights = W.LORA_WEIGHTS if mode == "lora" else "unet/diffusion_pytorch_model.safetensors"
    files = [CK.STATE_TENSORS, CK.STATE_JSON, weights] + (["unet/config.json"] if mode == "full" else [])
    for name in files:
        path = out / "checkpoint-2" / name
        whole = path.read_bytes()
        for damaged in (whole[:len(whole) // 2], b"", b"\x00" * len(whole)):  # truncated, emptied, overwritten
            path.write_bytes(damaged)
            with pytest.raises(data.InputError) as err:
                CK.resolve_resume(latest)
            message = str(err.value)
            assert f"({path} is cut short or corrupt: " in message and f"is {out / 'checkpoint-1'}: resume from it with resume='{out / 'checkpoint-1'}'" in message
        path.write_bytes(whole)
    assert CK.resolve_resume(latest) == out / "checkpoint-2"
    # Both damaged: no alternative; and train() says so before loading any model.
    for step in (1, 2):
        (out / f"checkpoint-{step}" / CK.STATE_TENSORS).write_bytes(b"")
    monkeypatch.setattr(T, "load_models", lambda cfg: pytest.fail("loaded models for a damaged checkpoint"))
    with pytest.raises(data.InputError, match=f"No earlier complete checkpoint is in {out}"):
        T.train(latest, progress=False)
    with pytest.raises(data.InputError, match="checkpoint-1 is damaged"):
        CK.resolve_resume(dataclasses.replace(cfg, resume=str(out / "checkpoint-1")))


def test_weights_are_readable_by_others_as_the_umask_says(tiny_model_dir, instance_dir, tmp_path):
    import os
    for mode in ("lora", "full"):
        cfg = make_cfg(tiny_model_dir, instance_dir, tmp_path / mode, use_lora=mode == "lora", optimizer="adamw")
        models = M.load_models(cfg)
        if cfg.use_lora:
            M.add_lora(models.denoiser, models.text_encoders, cfg)
        opt = torch.optim.AdamW([p for p in models.denoiser.parameters() if p.requires_grad])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        for umask in (0o022, 0o027):
            old = os.umask(umask)
            try:
                out = tmp_path / mode / oct(umask)
                CK.save_checkpoint(out, 1, models.denoiser, models.text_encoders, opt, sched, [], cfg)
                CK.save_final(out, models.denoiser, models.text_encoders, cfg)
            finally:
                os.umask(old)
            files = [p for p in out.rglob("*") if p.is_file()]
            assert any(p.suffix == ".safetensors" for p in files) and any(p.suffix == ".json" for p in files)
            assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}, mode


def test_notebook_run_folders_are_per_model_and_a_run_of_another_model_is_refused(tmp_path, instance_dir):
    toy, other = TrainConfig(instance_dir=str(instance_dir)), TrainConfig(instance_dir=str(instance_dir), pretrained_model="/m/flux1")
    assert T.run_dir(tmp_path, toy) == tmp_path / f"{instance_dir.name}-lora-prior"  # the toy model's folders keep their names
    assert T.run_dir(tmp_path, other, "full", prior=False) == tmp_path / f"{instance_dir.name}-full-noprior-flux1"
    two = dataclasses.replace(toy, subjects=[{"instance_dir": "/p/rex", "class_noun": "dog"}, {"instance_dir": "/p/tom", "class_noun": "cat"}])
    assert T.run_dir(tmp_path, two) == tmp_path / "rex+tom-lora-prior"
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"config": {"pretrained_model": "/m/flux1"}, "steps": 2}))
    assert T.finished_or_train(dataclasses.replace(other, output_dir=str(out)))["steps"] == 2  # reused, not retrained
    with pytest.raises(E.InputError, match="holds a run of /m/flux1, not of"):
        T.finished_or_train(dataclasses.replace(toy, output_dir=str(out)))
