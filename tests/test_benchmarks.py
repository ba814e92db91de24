"""Benchmarks: the SD1.5 build, MFU arithmetic, result files, and each script's --smoke run on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """The benchmark modules, imported the way the scripts import each other (benchmarks/ on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_train
    import common
    return common, bench_train


def run_script(name: str, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(BENCH / name), "--smoke", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_sd15_build_has_the_published_parameter_counts(bench, tmp_path):
    common, _ = bench
    parts = common.build_components(smoke=False, workdir=tmp_path, device="meta")  # shapes only, no memory
    counts = {k: sum(p.numel() for p in parts[k].parameters()) for k in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert parts["vae"].config.scaling_factor == 0.18215
    assert parts["tokenizer"].model_max_length == 77


def test_sdxl_build_has_the_published_parameter_counts(bench, tmp_path):
    common, _ = bench
    parts = common.build_components(smoke=False, workdir=tmp_path, device="meta", family="sdxl")
    counts = {k: sum(p.numel() for p in parts[k].parameters()) for k in ("unet", "vae", "text_encoder", "text_encoder_2")}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}
    assert parts["unet"].config.addition_embed_type == "text_time" and parts["unet"].config.cross_attention_dim == 2048
    assert (parts["vae"].config.scaling_factor, parts["vae"].config.force_upcast) == (0.13025, True)
    with pytest.raises(ValueError, match="unknown model family"):
        common.build_components(smoke=False, workdir=tmp_path, device="meta", family="sd3")


def test_flux_builds_have_the_published_parameter_counts(bench, tmp_path):
    """FLUX.1 [dev]: the counts its model card and the hub's safetensors index give (transformer 11.9 B, T5-XXL
    encoder 4.76 B); FLUX.2 [klein] 4B: Qwen3-4B's published 4,022,468,096, the transformer and VAE as built from
    the configs in common.py (the hub's exact counts were not readable here)."""
    common, _ = bench
    flux = common.build_components(smoke=False, workdir=tmp_path / "flux", device="meta", family="flux")
    counts = {k: sum(p.numel() for p in flux[k].parameters()) for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    assert counts == {"transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480,
                      "text_encoder_2": 4_762_310_656}
    assert (flux["vae"].config.scaling_factor, flux["vae"].config.shift_factor) == (0.3611, 0.1159)
    assert flux["transformer"].config.guidance_embeds and flux["transformer"].config.in_channels == 64
    klein = common.build_components(smoke=False, workdir=tmp_path / "klein", device="meta", family="flux2")
    counts = {k: sum(p.numel() for p in klein[k].parameters()) for k in ("transformer", "vae", "text_encoder")}
    assert counts == {"transformer": 3_875_544_576, "vae": 84_046_115, "text_encoder": 4_022_468_096}
    width = klein["transformer"].config.num_attention_heads * klein["transformer"].config.attention_head_dim
    assert width == 3072 and klein["transformer"].config.joint_attention_dim == 3 * 2560  # Qwen3 layers 9, 18, 27
    assert common.training_models(klein).family.NAME == "flux2" and common.family_of(flux) == "flux"


def test_profile_counts_operator_and_optimizer_calls_by_hand(bench):
    """4 parameters: a per-tensor SGD step calls add_ 4 times, a foreach one calls _foreach_add_ once."""
    common, _ = bench
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(4)]
    for foreach, direct, inside in ((False, 4, 4), (True, 1, 5)):  # foreach: 1 call, which runs 4 add_ on the CPU
        optimizer = torch.optim.SGD(params, lr=0.1, foreach=foreach)

        def step(_):
            for p in params:
                p.grad = torch.ones(3)  # aten::ones = aten::empty + aten::fill_
            optimizer.step()

        r = common.profile_steps(step, 2, "cpu")
        assert (r["optimizer_calls_per_step"], r["optimizer_operator_calls_per_step"]) == (direct, inside)
        assert r["operator_calls_per_step"] == 4 * 3 + inside and r["profile_steps"] == 2
        assert r["kernel_launches_per_step"] is None and r["gpu_busy_share"] is None and "no CUDA" in r["profile_note"]
        assert {"name": "aten::fill_", "calls_per_step": 4.0} in [
            {k: op[k] for k in ("name", "calls_per_step")} for op in r["top_cpu_ops"]]
    assert common._busy_us([(20, 30), (0, 10), (5, 15)]) == 25  # union of overlapping kernel intervals


def test_op_count_regressions_are_flagged_above_the_margin(bench, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import op_counts
    recorded = {"a": {"operator_calls_per_step": 1000, "optimizer_calls_per_step": 100, "optimizer_operator_calls_per_step": 200}}
    same = {"a": dict(recorded["a"])}
    assert op_counts.regressions(recorded, same, margin=0.05) == []
    more = {"a": dict(recorded["a"], optimizer_calls_per_step=106)}  # 6 % more calls
    assert op_counts.regressions(recorded, more, margin=0.05) == ["a: optimizer_calls_per_step 106 > recorded 100 + 5%"]
    assert "no recorded baseline" in op_counts.regressions(recorded, {"b": same["a"]})[0]


def test_training_step_operator_counts_do_not_exceed_the_recorded_baseline(bench, monkeypatch):
    """The CPU proxy of GPU launch overhead (benchmarks/op_counts.py): the tiny model's training step may not
    call more operators (or more optimizer operators) than benchmarks/results/op_counts.json records + margin.
    After a deliberate change (a lever that removes calls), re-record: `python benchmarks/op_counts.py`."""
    monkeypatch.syspath_prepend(str(BENCH))
    import op_counts
    recorded = json.loads(op_counts.RESULTS.read_text())["tiny"]
    measured = op_counts.count_configs(list(recorded["counts"]))
    problems = op_counts.regressions(recorded["counts"], measured)
    assert not problems, f"{problems} (recorded with torch {recorded['environment']['torch']}, now {torch.__version__})"


def test_mfu_uses_the_matching_dense_peak(bench):
    common, _ = bench
    value, note = common.mfu(2e12, 3.0, "NVIDIA H100 80GB HBM3", "bf16")
    assert value == pytest.approx(6e12 / 989.4e12) and "989.4" in note
    assert common.mfu(1e12, 1.0, "NVIDIA H100 PCIe", "fp16")[0] == pytest.approx(1 / 756)  # not the SXM peak
    assert common.mfu(1e12, 1.0, "NVIDIA A100-SXM4-80GB", "fp16")[0] == pytest.approx(1 / 312)
    t4, t4_note = common.mfu(1e12, 1.0, "Tesla T4", "bf16")
    assert t4 is None and "Tesla T4" in t4_note  # no bf16 tensor cores
    unknown, unknown_note = common.mfu(1e12, 1.0, "Tesla V100-SXM2-16GB", "fp16")
    assert unknown is None and "V100" in unknown_note and "H200" in unknown_note


def test_append_results_keeps_order_and_rejects_other_json(bench, tmp_path):
    common, _ = bench
    path = tmp_path / "r" / "train.json"
    common.append_results(path, [{"a": 1}])
    common.append_results(path, [{"a": 2}, {"a": 3}])
    assert json.loads(path.read_text()) == [{"a": 1}, {"a": 2}, {"a": 3}]
    path.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="not a JSON list"):
        common.append_results(path, [{"a": 4}])


def test_markdown_table(bench):
    common, _ = bench
    table = common.markdown_table([{"config": "x", "mfu": 0.123456, "gb": None}], ["config", "mfu", "gb"])
    assert table == "| config | mfu | gb |\n|---|---|---|\n| x | 0.123 |  |"


def test_config_matrix_and_names(bench):
    _, bench_train = bench
    names = bench_train.config_names()
    assert len(names) == len(set(names)) == (6 + 1) * 2 * 2 + 6 + 2 + 4 + 8  # methods (+ bf16 full) x cache x compile + modes + optimizers + SDXL + FLUX
    base, *_ = bench_train.parse_name("full-fp16-cached", smoke=False)  # the H200 table's baseline, levers off
    assert (base.optimizer, base.gradient_checkpointing, base.channels_last, base.compile) == ("adamw8bit", True, False, "off")
    fast, _, compiled, _, note = bench_train.parse_name("lora4-fp16-cached-fast", smoke=False)
    assert (fast.optimizer, fast.gradient_checkpointing, fast.channels_last) == ("auto", "auto", "auto") and compiled
    assert (fast.compile, fast.compile_mode, fast.compile_backend, note) == ("step", "reduce-overhead", "inductor", "")
    low, *_ = bench_train.parse_name("full-fp16-cached-lowmem", smoke=False)
    assert (low.optimizer, low.gradient_checkpointing, low.compile) == ("adamw8bit", True, "off")
    for mode, optimizer in (("auto", "auto"), ("bnb8", "adamw8bit"), ("torchao8", "adamw8bit-torchao")):  # side by side
        opt_cfg, *_ = bench_train.parse_name(f"full-fp16-cached-{mode}", smoke=False)
        assert (opt_cfg.optimizer, opt_cfg.gradient_checkpointing, opt_cfg.compile) == \
            (optimizer, "auto" if mode == "auto" else False, "off")
    assert bench_train.parse_name("full-fp16-cached-fast", smoke=True)[0].compile_backend == "aot_eager"  # CPU
    xl, method, *_ = bench_train.parse_name("sdxl-full-bf16-cached", smoke=False)
    assert (xl.model_family, xl.resolution, xl.optimizer, xl.mixed_precision, xl.use_lora, method) == \
        ("sdxl", 1024, "adamw8bit", "bf16", False, "full")  # issue 13: full SDXL with 8-bit AdamW at 1024 px
    assert bench_train.parse_name("lora4-fp16-cached", smoke=False)[0].model_family == "sd"
    cfg, method, compiled, cached, note = bench_train.parse_name("lora16-te-fp16-uncached-compile", smoke=False)
    assert (method, compiled, cached, note) == ("lora16-te", True, False, "")
    assert (cfg.use_lora, cfg.lora_rank, cfg.train_text_encoder, cfg.cache_latents) == (True, 16, True, False)
    assert (cfg.mixed_precision, cfg.resolution, cfg.optimizer, cfg.gradient_checkpointing) == ("fp16", 512, "adamw8bit", True)
    smoke_cfg, *_, smoke_note = bench_train.parse_name("full-fp16-cached", smoke=True)
    assert (smoke_cfg.mixed_precision, smoke_cfg.resolution) == ("bf16", 32) and "bf16" in smoke_note
    cpu_cfg, *_ = bench_train.parse_name("lora4-fp16-cached", smoke=False, resolution=64, cpu=True)
    assert (cpu_cfg.mixed_precision, cpu_cfg.resolution) == ("bf16", 64)  # SD1.5's op counts on the CPU
    q, method, compiled, cached, _ = bench_train.parse_name("flux-qlora16-nf4-cached-1024", smoke=False)
    assert (q.model_family, q.resolution, q.quantize_base, q.use_lora, q.lora_rank, q.mixed_precision, method) == \
        ("flux", 1024, "nf4", True, 16, "bf16", "qlora16-nf4") and cached and not compiled
    k, *_ = bench_train.parse_name("klein4b-lora16-bf16-cached-512", smoke=False)
    assert (k.model_family, k.resolution, k.quantize_base, k.max_sequence_length) == ("flux2", 512, "no", 512)
    assert bench_train.parse_name("klein4b-lora16-bf16-cached-512", smoke=True)[0].resolution == 32
    for bad in ("full-fp8-cached", "lora8-fp16-cached", "full-fp16", "full-fp16-cached-turbo", "sdxl-lora16-fp16-cached",
                "klein4b-qlora16-nf4-cached-768", "flux-lora16-bf16-cached-768"):
        with pytest.raises(SystemExit, match="unknown config"):
            bench_train.parse_name(bad, smoke=False)


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "train.json"
    run_script("bench_train.py", "--results", str(out), "--configs", "full-fp16-cached", "lora4-te-fp16-uncached",
               "--profile", "1")
    full, lora = json.loads(out.read_text())
    assert [full["config"], lora["config"]] == ["full-fp16-cached", "lora4-te-fp16-uncached"]
    for r in (full, lora):
        assert r["status"] == "ok" and r["losses_finite"] and r["timed_steps"] == 2 and r["warmup_steps"] == 1
        assert r["images_per_s"] == 2 * r["steps_per_s"] > 0  # 1 instance + 1 class image per step
        assert r["model_tflops_per_step"] > 0 and r["mfu"] is None  # the CPU has no entry in the peak table
        assert r["optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit" and r["mixed_precision"] == "bf16"
        assert f"--one {r['config']}" in r["command"]
    assert (full["cached"], lora["cached"]) == (True, False)
    # --profile: operator counts on the CPU; the GPU-only fields are null and say why
    assert full["profile_steps"] == 1 and full["optimizer_calls_per_step"] > lora["optimizer_calls_per_step"] > 0
    assert lora["operator_calls_per_step"] > lora["optimizer_operator_calls_per_step"] > 0
    assert full["top_cpu_ops"][0]["ms_per_step"] > 0 and full["top_kernels"] is None and "no CUDA" in full["profile_note"]
    assert full["trainable_parameters"] == 52_004  # the whole tiny UNet (train.py reports the same count)
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"]
    # The uncached step also runs the VAE encoder and the text encoder.
    assert lora["model_tflops_per_step"] > full["model_tflops_per_step"]


def test_bench_generate_smoke(tmp_path):
    out = tmp_path / "generate.json"
    run_script("bench_generate.py", "--results", str(out))
    records = json.loads(out.read_text())
    assert [(r["precision"], r["batch_size"], r["images"]) for r in records] == [("fp32", 1, 2), ("fp32", 2, 2)]
    for r in records:
        assert r["status"] == "ok" and r["resolution"] == 32 and r["num_inference_steps"] == 2
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"])


def test_bench_e2e_smoke(tmp_path):
    out = tmp_path / "e2e.json"
    run_script("bench_e2e.py", "--results", str(out))
    (r,) = json.loads(out.read_text())
    assert r["status"] == "ok" and (r["class_images"], r["train_steps"]) == (2, 3)
    assert r["total_s"] == pytest.approx(r["class_images_s"] + r["train_s"])
    assert list(r["phase_s"]) == ["class_images", "data", "load", "setup", "cache", "train", "save"]
    assert r["phase_s"]["class_images"] == r["class_images_s"] and r["class_images_per_s"] == 2 / r["class_images_s"]
    assert sum(r["phase_s"].values()) == pytest.approx(r["total_s"], abs=0.1)  # the phases cover the wall clock
    assert r["optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit" and torch.isfinite(torch.tensor(r["final_loss"]))


def test_gpu_check_kills_a_part_at_its_time_box_children_included(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check
    pid_file = tmp_path / "grandchild.pid"
    grandchild = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    slow = gpu_check.Part("slow", 1, 1, [[sys.executable, "-c", child], [sys.executable, "-c", "print('never')"]])
    record = gpu_check.run_part(slow, limit=3, log=lambda m: None)
    assert record["status"].startswith("timeout") and record["seconds"] < 10
    stat = Path(f"/proc/{pid_file.read_text()}/stat")  # the whole process group went, not just the direct child
    for _ in range(50):  # (a zombie waiting for a reaper counts as gone)
        if not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the part's grandchild {pid_file.read_text()} still runs after the time box")
    failing = gpu_check.Part("bad", 1, 1, [[sys.executable, "-c", "raise SystemExit(3)"]])
    assert gpu_check.run_part(failing, limit=30, log=lambda m: None)["status"] == "failed: exit code 3"


def test_gpu_check_sets_ours_beside_diffusers_from_one_run(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check
    (tmp_path / "train.json").write_text(json.dumps([
        {"config": "full-fp16-cached", "status": "ok", "method": "full", "steps_per_s": 9.0, "peak_allocated_gb": 9.5},
        {"config": "lora4-fp16-cached", "status": "ok", "method": "lora4", "steps_per_s": 6.0},
        {"config": "full-bf16-cached", "status": "failed: OutOfMemoryError"}]))
    (tmp_path / "diffusers_full.json").write_text(json.dumps({"script": "train_dreambooth.py", "steps_per_s": 3.0}))
    rows = gpu_check.side_by_side(tmp_path)  # no diffusers_lora.json: that ratio is unknown, not invented
    assert [(r["ours"], r.get("speedup")) for r in rows] == [("full-fp16-cached", 3.0), ("lora4-fp16-cached", None),
                                                             ("full-bf16-cached", None)]
    assert rows[2]["status"].startswith("failed")
    # The GPU command lines are the H200 table's (anchors README): same flags, 25 steps, warm-up 5.
    parts = {p.name: p for p in gpu_check.parts("python3", tmp_path, tmp_path, tmp_path / "anchors", smoke=False)}
    full = parts["diffusers_full"].commands[0]
    assert full[2:4] == [str(tmp_path / "diffusers_full.json"), "5"] and full[4].endswith("train_dreambooth.py")
    assert {"--gradient_checkpointing", "--use_8bit_adam", "--mixed_precision=fp16", "--resolution=512",
            "--max_train_steps=25", "--with_prior_preservation", "--learning_rate=5e-6"} <= set(full)
    assert "--rank=4" in parts["diffusers_lora"].commands[0]
    assert list(parts)[-5:] == ["optimizers", "train_flux", "flux_inputs", "diffusers_flux_lora", "flux_16gb"]  # FLUX: later calls
    e2e = parts["flux_16gb"].commands[0]
    assert e2e[1].endswith("bench_e2e.py") and e2e[e2e.index("--config") + 1] == "flux-qlora16-nf4-cached-1024"
    assert e2e[e2e.index("--memory-cap-gib") + 1] == "15" and e2e[-1] == str(tmp_path / "flux" / "model")
    assert parts["optimizers"].commands[0][-3:] == gpu_check.OPTIMIZERS
    assert [c[3] for c in parts["compile_bug"].commands] == ["nchw", "channels-last", "nchw-no-layout-opt"]
    # FLUX.1 (issue 18): diffusers' LoRA script with our flux-lora16-bf16-cached-1024's settings, beside ours
    flux = parts["diffusers_flux_lora"].commands[0]
    assert flux[4].endswith("train_dreambooth_lora_flux.py") and {
        "--rank=16", "--mixed_precision=bf16", "--resolution=1024", "--cache_latents", "--use_8bit_adam",
        "--gradient_checkpointing", "--with_prior_preservation", "--max_sequence_length=512", "--guidance_scale=1.0"} <= set(flux)
    assert parts["train_flux"].commands[0][-8:-4] == gpu_check.TRAIN_FLUX
    (tmp_path / "train_flux.json").write_text(json.dumps([
        {"config": "flux-qlora16-nf4-cached-1024", "status": "ok", "method": "qlora16-nf4", "steps_per_s": 1.5}]))
    (tmp_path / "diffusers_flux_lora.json").write_text(json.dumps({"script": "train_dreambooth_lora_flux.py",
                                                                   "steps_per_s": 1.0}))
    flux_row = gpu_check.side_by_side(tmp_path)[-1]
    assert (flux_row["ours"], flux_row["diffusers"], flux_row["speedup"]) == \
        ("flux-qlora16-nf4-cached-1024", "train_dreambooth_lora_flux.py", 1.5)


def test_sdxl_bench_configs_train_the_tiny_sdxl_model_through_the_library(bench, tmp_path):
    """Issue 13's SDXL configs take the library's SDXL path (two text encoders, time ids) in --smoke size."""
    _, bench_train = bench
    from dreambooth_lib import train
    cfg, method, *_ = bench_train.parse_name("sdxl-lora4-fp16-cached", smoke=True)
    state = bench_train.build_state(cfg, True, tmp_path)
    assert (state.models.family.NAME, method, cfg.resolution) == ("sdxl", "lora4", 32)
    assert len(state.models.text_encoders) == 2 and state.models.denoiser.config.addition_embed_type == "text_time"
    losses = [train.train_step(state, step)["loss"] for step in range(2)]
    assert all(map(math.isfinite, losses)) and train.optimizer_name(state.optimizer).endswith("AdamW8bit")


def test_flux_bench_configs_train_the_tiny_flux_models_through_the_library(bench, tmp_path):
    """Issue 18's configs in --smoke size take the library's path: FLUX.1 QLoRA over an NF4 transformer (read back
    through from_pretrained with the library's BitsAndBytesConfig; bitsandbytes runs NF4 on the CPU) and
    FLUX.2 [klein] LoRA; two steps each, finite losses, LoRA (rank 16) the only trained weights."""
    from bitsandbytes.nn import Linear4bit
    from dreambooth_lib import train
    _, bench_train = bench
    for name, family, quantized in (("flux-qlora16-nf4-cached-1024", "flux", True),
                                    ("klein4b-lora16-bf16-cached-1024", "flux2", False),
                                    ("klein4b-qlora16-nf4-cached-1024", "flux2", True)):
        cfg, *_ = bench_train.parse_name(name, smoke=True)
        state = bench_train.build_state(cfg, True, tmp_path / name)
        denoiser = state.models.denoiser
        assert state.models.family.NAME == family and cfg.resolution == 32
        assert any(isinstance(m, Linear4bit) for m in denoiser.modules()) == quantized
        trained = [n for n, p in denoiser.named_parameters() if p.requires_grad]
        assert trained and all("lora_" in n for n in trained)
        assert {p.shape[0] for n, p in denoiser.named_parameters() if "lora_A" in n} == {16}
        losses = [train.train_step(state, step)["loss"] for step in range(2)]
        assert all(map(math.isfinite, losses)) and train.optimizer_name(state.optimizer).endswith("AdamW8bit")


def test_memory_plan_estimates_for_flux_follow_the_published_sizes(bench, tmp_path):
    """The README's estimate table (bench_train --plan): weights from the published parameter counts, by hand."""
    _, bench_train = bench
    weight_bytes, trainable, acts = bench_train.plan_inputs("flux-lora16-bf16-cached-1024", tmp_path)
    frozen = 11_901_408_320 + 83_819_683  # transformer, VAE (bf16); CLIP and T5 leave the GPU once cached
    # LoRA r16, diffusers' FLUX targets: per double block 8 attention projections 3072 -> 3072 and 4 feed-forward
    # layers 3072 <-> 12288; per single block q, k, v (r x (in + out) each)
    assert trainable == 19 * (8 * 16 * 6144 + 4 * 16 * 15360) + 38 * 3 * 16 * 6144
    assert weight_bytes == 2 * frozen + 4 * trainable
    # tokens (1024 / 8 / 2)^2 + 512 text, 3072 wide, 19 + 38 blocks, 2 images, bf16; without checkpointing 17
    # values a token and unit in each block, with it 1 (the block's input) + 17 of the block recomputed in backward
    assert acts[False] == (64 * 64 + 512) * 3072 * 57 * 17 * 2 * 2
    assert acts[True] == (64 * 64 + 512) * 3072 * (57 + 17) * 2 * 2
    q_bytes, q_trainable, q_acts = bench_train.plan_inputs("flux-qlora16-nf4-cached-1024", tmp_path)
    assert (q_trainable, q_acts) == (trainable, acts)
    assert 2 * frozen * 0.25 < q_bytes < 2 * frozen * 0.3  # the 11.9 B transformer at ~4 bits (0.5 bytes + scales)


def test_the_memory_cap_makes_the_gpu_act_as_a_smaller_one(monkeypatch):
    """bench_e2e --memory-cap-gib: the allocator's fraction, and the free memory the library reads, follow the cap."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_e2e
    gib, fractions = 2**30, []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 150 * gib}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device=None: fractions.append(fraction))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", torch.cuda.mem_get_info)  # put back after the test
    bench_e2e.cap_device_memory(15 * gib)
    assert fractions == [pytest.approx(0.1)] and torch.cuda.mem_get_info(0) == (9 * gib, 15 * gib)
