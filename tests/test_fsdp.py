"""Sharded full fine-tuning (FSDP2 through accelerate): two gloo CPU processes give one process's training,
checkpoints hold the whole state, resume is exact, the weights load in a stock FluxPipeline; and what FSDP
cannot train is refused before any model loads.

The launch line is docs/scaling_out.md's, with the CPU variables of the multiprocess test:
    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes 2 ...
(tests/fsdp_worker.py says what it changes in accelerate's state, and why, for CPU processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

import dreambooth_lib.checkpoint as CK
import dreambooth_lib.models as M
import dreambooth_lib.step as S
import dreambooth_lib.train as T
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import InputError
from dreambooth_lib.tiny import save_tiny_flux2_pipeline, save_tiny_flux_pipeline
from dreambooth_lib.validate import validate_config

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_worker import SETTINGS  # noqa: E402
from test_multiprocess import free_port, one_thread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def launched(flux_dir, tmp_path_factory):
    """One 2-process FSDP launch of tests/fsdp_worker.py; returns its folder, inputs and records."""
    from conftest import write_photos

    root = tmp_path_factory.mktemp("fsdp")
    instance_dir = root / "instance"
    write_photos(instance_dir)
    model, flux2 = flux_dir, save_tiny_flux2_pipeline(root / "klein")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate_fsdp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           str(ROOT / "tests" / "fsdp_worker.py"), str(root), str(model), str(instance_dir), str(flux2)]
    started = time.time()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    print(f"2-process FSDP launch: {time.time() - started:.1f} s")
    calls = [json.loads((root / f"fsdp-rank{r}.json").read_text()) for r in (0, 1)]
    return dict(root=root, model=str(model), instance_dir=str(instance_dir), calls=calls, stdout=run.stdout)


def summary(root: Path, run: str) -> dict:
    return json.loads((root / run / "summary.json").read_text())


def test_the_config_shards_the_transformer_blocks(launched):
    calls = launched["calls"]
    # CPU processes without the worker's state change: accelerate made them MULTI_CPU, refused (would not shard).
    assert "accelerate set up MULTI_CPU" in calls[0]["refused"] and "configs/accelerate_fsdp.yaml" in calls[0]["refused"]
    assert calls[0]["plugin"] == dict(version=2, reshard=True, state_dict_type="FULL_STATE_DICT",
                                      wrap="transformer_auto_wrap_policy",
                                      names=["FluxTransformerBlock", "FluxSingleTransformerBlock"])
    # One FSDP unit per block (the tiny model has one of each), the final norm (accelerate's tail unit) and the
    # root; both runs, both processes.
    units = ["FSDPAdaLayerNormContinuous", "FSDPFluxSingleTransformerBlock", "FSDPFluxTransformer2DModel",
             "FSDPFluxTransformerBlock"]
    assert all(c["units"] == [units, units] for c in calls)
    # Each process holds about half of the 78,544 weights (dim-0 shards; odd first dimensions round up).
    (local0, total), (local1, _) = calls[0]["share"][0], calls[1]["share"][0]
    assert total == 78_544 and local0 + local1 == total and abs(local0 - local1) < 0.02 * total
    # The same config file wraps FLUX.2 [klein]'s blocks (the model's _no_split_modules).
    assert calls[0]["flux2_units"] == ["Flux2SingleTransformerBlock", "Flux2TransformerBlock"]
    assert "FSDP2: the denoiser's weights, gradients and optimizer states sharded over 2 processes" in launched["stdout"]


def test_two_fsdp_processes_train_as_one_process_with_the_same_batch(launched, tmp_path, monkeypatch):
    # One process accumulating 2 micro-batches sees, per optimizer step, the items the 2 processes see (the
    # data stream is dealt by micro-step x processes + rank); its micro-step m draws noise and timesteps as
    # rank m % 2 of micro-step m // 2 does. Gradients: FSDP's reduce-scatter mean == accumulation's mean.
    real = S.step_generator
    monkeypatch.setattr(S, "step_generator", lambda seed, m, rank, device: real(seed, m // 2, m % 2, device))
    with one_thread():
        one = T.train(TrainConfig(**{**SETTINGS, "pretrained_model": launched["model"], "instance_dir": launched["instance_dir"],
                                     "output_dir": str(tmp_path), "gradient_accumulation_steps": 2, "checkpointing_steps": 0}),
                      progress=False, log=lambda *_: None)
    two = summary(launched["root"], "whole")
    assert two["num_processes"] == 2 and two["effective_batch_size"] == one["effective_batch_size"] == 2
    assert [h["loss"] for h in two["loss_history"]] == pytest.approx([h["loss"] for h in one["loss_history"]], abs=1e-5)
    a, b = load_file(launched["root"] / "whole" / TRANSFORMER), load_file(tmp_path / TRANSFORMER)
    base = load_file(Path(launched["model"]) / TRANSFORMER)
    assert a.keys() == b.keys() == base.keys()
    moved = max(float((b[k] - base[k]).abs().max()) for k in b)
    differ = max(float((a[k] - b[k]).abs().max()) for k in a)
    # 4 AdamW steps of lr 1e-3 (linear decay) moved weights by up to 2.5e-3; the runs differ by float rounding
    # (measured 1.6e-6: FSDP's reduce-scatter sums in another order than accumulation).
    assert moved > 2e-3 and differ < 2e-5, (moved, differ)


def test_resumed_fsdp_run_equals_uninterrupted_and_checkpoints_hold_the_whole_state(launched):
    root = launched["root"]
    whole, resumed = summary(root, "whole"), summary(root, "resumed")
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == 4
    assert [h["loss"] for h in resumed["loss_history"]] == [h["loss"] for h in whole["loss_history"]]
    for part in (TRANSFORMER, "checkpoint-4/" + TRANSFORMER):
        a, b = load_file(root / "whole" / part), load_file(root / "resumed" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    # The optimizer state is gathered whole, keyed by parameter names: every AdamW moment has its weight's full shape.
    checkpoint = root / "whole" / "checkpoint-2"
    state = json.loads((checkpoint / CK.STATE_JSON).read_text())
    tensors, weights = load_file(checkpoint / CK.STATE_TENSORS), load_file(checkpoint / TRANSFORMER)
    assert state["sharding"] == "fsdp" and state["num_processes"] == 2
    moments = {k.removeprefix("optimizer.state.").rsplit(".", 1)[0]: v for k, v in tensors.items() if k.endswith(".exp_avg_sq")}
    assert moments.keys() == weights.keys() and all(moments[k].shape == weights[k].shape for k in weights)
    assert all(float(v.min()) >= 0 for v in moments.values()) and any(float(v.max()) > 0 for v in moments.values())
    # Only the main process wrote: one set of outputs, the validation grid rendered by both (a sharded forward).
    assert sorted(p.name for p in (root / "whole").iterdir() if p.is_dir() and p.name.startswith("checkpoint")) == [
        "checkpoint-2", "checkpoint-4"]
    assert (root / "whole" / "validation" / "step-4.png").is_file()
    # An FSDP checkpoint is refused by a run without FSDP (its optimizer state is keyed differently), before loading.
    with pytest.raises(InputError, match="written by a run with FSDP"):
        CK.resolve_resume(TrainConfig(resume=str(checkpoint)), num_processes=2)


def test_fsdp_weights_load_in_the_stock_pipeline(launched):
    pipe = FluxPipeline.from_pretrained(launched["root"] / "whole")
    saved = load_file(launched["root"] / "whole" / TRANSFORMER)
    assert all(torch.equal(pipe.transformer.state_dict()[k], v) for k, v in saved.items())
    image = pipe("a photo of sks dog", height=32, width=32, num_inference_steps=1, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32) and np.asarray(image).std() > 0


def test_the_memory_plan_counts_one_shard_and_never_picks_8bit_adam(flux_dir, instance_dir, tmp_path, monkeypatch):
    cfg = TrainConfig(**{**SETTINGS, "pretrained_model": str(flux_dir), "instance_dir": str(instance_dir),
                         "output_dir": str(tmp_path), "optimizer": "auto"})
    models = M.load_models(cfg)
    assert M.memory_plan(cfg, models, "cpu", shards=2).optimizer == "adamw"  # the CPU default is 8-bit without FSDP
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1e3, 80e9))  # nothing fits: the last choice
    plan = M.memory_plan(cfg, models, "cuda", shards=2)
    assert (plan.optimizer, plan.gradient_checkpointing) == ("adamw", True) and "8bit" not in plan.reason
    denoiser = sum(p.numel() for p in models.denoiser.parameters())
    rest = sum(t.numel() * 4 for t in (*models.vae.parameters(), *models.vae.buffers()))  # text encoders: off the GPU
    acts = models.family.activation_bytes(models.denoiser.config, 1, 32, 4, True, 8, 16)
    # Per process: half the fp32 transformer, its gradients and AdamW's two states (4 + 4 + 8 bytes a parameter).
    assert plan.estimated_peak_gb == pytest.approx((rest + denoiser / 2 * 16 + acts) / 1e9, rel=1e-3)


@pytest.mark.parametrize("setting, message", [
    (dict(use_lora=True), "use_lora = True under FSDP"),
    (dict(use_lora=True, quantize_base="nf4"), "quantize_base = 'nf4' under FSDP"),
    (dict(train_text_encoder=True), "train_text_encoder = True under FSDP"),
    (dict(optimizer="adamw8bit"), "optimizer = 'adamw8bit' under FSDP.*bitsandbytes' 8-bit AdamW cannot"),
    (dict(compile="blocks"), "compile = 'blocks' under FSDP"),
])
def test_what_fsdp_cannot_train_is_refused_before_model_work(setting, message, instance_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with the FSDP config sets
    cfg = TrainConfig(instance_dir=str(instance_dir), class_noun="dog", with_prior_preservation=False,
                      output_dir=str(tmp_path), **setting)
    with pytest.raises(InputError, match=message):
        validate_config(cfg)
    validate_config(TrainConfig(instance_dir=str(instance_dir), class_noun="dog", with_prior_preservation=False))


def test_deepspeed_fsdp_activation_checkpointing_and_unsharded_fsdp_launches_are_refused(instance_dir, monkeypatch,
                                                                                         tmp_path):
    cfg = TrainConfig(instance_dir=str(instance_dir), class_noun="dog", with_prior_preservation=False,
                      output_dir=str(tmp_path), max_train_steps=1)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(InputError, match="DeepSpeed .* does not support"):
        validate_config(cfg)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(InputError, match="fsdp_activation_checkpointing: true"):
        validate_config(cfg)
    monkeypatch.delenv("FSDP_ACTIVATION_CHECKPOINTING")
    # One plain process with ACCELERATE_USE_FSDP set (an FSDP config without a launch that shards): refused at
    # set-up, before any model loads.
    monkeypatch.setattr(T, "load_tokenizer", lambda cfg: pytest.fail("reached model work"))
    with pytest.raises(InputError, match="accelerate set up NO"):
        T.train(cfg, progress=False, log=lambda *_: None)
