"""CLI: every TrainConfig field is a flag; train / sample run end to end; evaluate is delegated; a run folder is the
handle after training; auto learning rates; quiet logs; one flag spelling."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types

import numpy as np
import torch
import pytest
from PIL import Image

from dreambooth_lib import __main__ as cli
from dreambooth_lib.config import TrainConfig


def test_help_lists_every_config_field():
    out = subprocess.run([sys.executable, "-m", "dreambooth_lib", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in out, f.name
    assert "LoRA rank r" in out  # help text comes from the field's comment


def test_flags_override_config_file(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"learning_rate": 1e-4, "lora_rank": 8, "class_noun": "cat"}))
    args = cli.build_parser().parse_args(
        ["train", "--config", str(tmp_path / "run.json"), "--lora_rank", "16", "--no-center_crop", "--use_lora",
         "--validation_prompts", "a {identifier} dog", "a dog", "--checkpoints_total_limit", "none"])
    cfg = cli.config_from_args(args)
    assert (cfg.learning_rate, cfg.lora_rank, cfg.class_noun) == (1e-4, 16, "cat")
    assert cfg.center_crop is False and cfg.use_lora is True and cfg.checkpoints_total_limit is None
    assert cfg.validation_prompts == ["a {identifier} dog", "a dog"] and cfg.max_train_steps == TrainConfig.max_train_steps


def test_a_config_file_of_an_older_run_still_loads(tmp_path):
    # lora_unet_modules was renamed lora_modules (the denoiser may be a transformer): old files keep working.
    (tmp_path / "old.json").write_text(json.dumps({"lora_unet_modules": ["to_q", "to_v"], "use_lora": True}))
    cfg = cli.config_from_args(cli.build_parser().parse_args(["train", "--config", str(tmp_path / "old.json")]))
    assert cfg.lora_modules == ["to_q", "to_v"]
    (tmp_path / "bad.json").write_text(json.dumps({"lora_unet_module": ["to_q"]}))
    with pytest.raises(ValueError, match="unknown TrainConfig fields \\['lora_unet_module'\\]"):
        cli.config_from_args(cli.build_parser().parse_args(["train", "--config", str(tmp_path / "bad.json")]))


def test_train_then_sample_end_to_end(tiny_model_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    rc = cli.main(["train", "--pretrained_model", str(tiny_model_dir), "--instance_dir", str(instance_dir),
                   "--class_noun", "dog", "--identifier", "sks", "--resolution", "32", "--use_lora",
                   "--num_class_images", "2", "--class_inference_steps", "1", "--max_train_steps", "2",
                   "--validation_steps", "0", "--checkpointing_steps", "0", "--output_dir", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["use_lora"] is True and summary["num_class_images"] == 2
    assert {"wall_time_s", "final_loss", "peak_memory_mb", "device", "loss_history"} <= summary.keys()

    grid = tmp_path / "grid.png"
    rc = cli.main(["sample", "--model", str(tiny_model_dir), "--lora_dir", str(out), "--prompt", "a photo of sks dog",
                   "a sks dog in snow", "--seeds", "0", "1", "2", "--num_inference_steps", "2", "--out", str(grid)])
    assert rc == 0 and Image.open(grid).size == (3 * 32, 2 * 32)
    assert json.loads(grid.with_suffix(".json").read_text())["num_images"] == 6


def test_bad_input_is_a_message_not_a_traceback(tmp_path, capsys):
    rc = cli.main(["train", "--instance_dir", str(tmp_path / "missing"), "--class_noun", "dog"])
    assert rc == 2 and "instance_dir" in capsys.readouterr().err


def test_evaluate_is_delegated(monkeypatch, capsys):
    seen = []
    monkeypatch.setitem(sys.modules, "dreambooth_lib.evaluate", types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0))
    assert cli.main(["evaluate", "--model", "m"]) == 0 and seen == [["--model", "m"]]


def test_class_images_needs_no_photos_and_train_reuses_them(tiny_model_dir, instance_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny_model_dir.parent)
    out = tmp_path / "run"
    common = ["--class_noun", "dog", "--resolution", "32", "--num_class_images", "2", "--class_inference_steps", "1",
              "--output_dir", str(out)]
    # Only what class images need: no --instance_dir, the model named by a relative path.
    assert cli.main(["class-images", "--pretrained_model", tiny_model_dir.name, *common]) == 0
    assert "generating 2 class images" in capsys.readouterr().out
    images = sorted((out / "class_images").glob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in images]
    summary = json.loads((out / "class_images" / "class_images_summary.json").read_text())
    assert len(images) == 2 and summary["num_images"] == 2 and summary["class_prompt"] == "a photo of a dog"

    rc = cli.main(["train", "--pretrained_model", str(tiny_model_dir), "--instance_dir", str(instance_dir),
                   "--identifier", "sks", "--max_train_steps", "1", "--validation_steps", "0",
                   "--checkpointing_steps", "0", "--optimizer", "adamw", *common])
    assert rc == 0 and "generating" not in capsys.readouterr().out  # same weights, absolute path: reused
    assert [p.stat().st_mtime_ns for p in images] == stamps
    assert json.loads((out / "summary.json").read_text())["num_class_images"] == 2

    assert cli.main(["class-images", "--num_class_images", "2"]) == 2  # still refuses what it cannot do
    assert "class_noun" in capsys.readouterr().err


def test_a_full_disk_is_a_message_not_a_traceback(tiny_model_dir, instance_dir, tmp_path, capsys, monkeypatch):
    import errno

    import dreambooth_lib.checkpoint as CK

    def full_disk(folder, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CK, "save_weights", full_disk)
    rc = cli.main(["train", "--pretrained_model", str(tiny_model_dir), "--instance_dir", str(instance_dir),
                   "--class_noun", "dog", "--resolution", "32", "--use_lora", "--no-with_prior_preservation",
                   "--max_train_steps", "1", "--validation_steps", "0", "--checkpointing_steps", "1",
                   "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 1 and "error: could not write checkpoint-1" in err and "No space left on device (ENOSPC)" in err
    assert "no checkpoint was written before" in err and "Traceback" not in err


# --- a new user's first hour (issue 20) -----------------------------------------------------------

def quick_train(tiny_model_dir, instance_dir, out, *flags) -> list[str]:
    return ["train", "--pretrained_model", str(tiny_model_dir), "--instance_dir", str(instance_dir), "--class_noun", "dog",
            "--identifier", "sks", "--resolution", "32", "--num_class_images", "2", "--class_inference_steps", "1",
            "--max_train_steps", "2", "--validation_steps", "0", "--checkpointing_steps", "0", "--output_dir", str(out),
            *flags]


def test_learning_rate_auto_follows_the_method_and_is_logged(tiny_model_dir, instance_dir, tmp_path, capsys):
    assert cli.main(quick_train(tiny_model_dir, instance_dir, tmp_path / "lora", "--use_lora")) == 0
    printed = capsys.readouterr().out
    assert "learning_rate 0.0001 (auto; LoRA: diffusers' DreamBooth-LoRA example rate and rank)" in printed
    assert "lora_rank 4 (auto;" in printed
    lora = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert lora["config"]["learning_rate"] == 1e-4 and lora["config"]["lora_rank"] == 4
    assert [r["lr"] for r in lora["loss_history"]] == [1e-4, 1e-4]  # what the optimizer ran at (constant schedule)

    assert cli.main(quick_train(tiny_model_dir, instance_dir, tmp_path / "full", "--train_text_encoder")) == 0
    printed = capsys.readouterr().out
    assert "learning_rate 5e-06 (auto; full fine-tune: the paper's and diffusers' train_dreambooth.py rate)" in printed
    assert "text_encoder_lr 5e-06 (the UNet rate)" in printed
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert [r["lr"] for r in full["loss_history"]] == [5e-6, 5e-6]

    # An explicit value wins, and nothing is said about it.
    assert cli.main(quick_train(tiny_model_dir, instance_dir, tmp_path / "set", "--use_lora", "--learning_rate", "3e-4")) == 0
    assert "learning_rate" not in capsys.readouterr().out.split("plan:")[0]
    assert json.loads((tmp_path / "set" / "summary.json").read_text())["loss_history"][0]["lr"] == 3e-4


def test_auto_rates_on_the_toy_model_are_the_swept_ones():
    from dreambooth_lib.config import TOY_MODEL_DIR, resolve_auto

    lora, lines = resolve_auto(TrainConfig(pretrained_model=TOY_MODEL_DIR, use_lora=True, train_text_encoder=True))
    assert (lora.learning_rate, lora.text_encoder_lr, lora.lora_rank) == (1e-3, 1e-4, 32)  # run cl_s1600
    assert any("cl_s1600" in line for line in lines)
    full, _ = resolve_auto(TrainConfig(pretrained_model=TOY_MODEL_DIR))
    assert (full.learning_rate, full.text_encoder_lr) == (1e-4, 3e-5)  # run cf_te3e5
    kept, lines = resolve_auto(TrainConfig(learning_rate=2e-6, text_encoder_lr=None, lora_rank=8, pretrained_model="x/y"))
    assert (kept.learning_rate, kept.text_encoder_lr, kept.lora_rank) == (2e-6, 2e-6, 8) and lines == []  # None = lr, as before


def grid_pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_sample_a_run_folder_gives_the_images_of_the_explicit_flags(tiny_model_dir, instance_dir, tmp_path, capsys):
    common = ["--seeds", "0", "1", "--num_inference_steps", "2"]
    # LoRA run: base model, LoRA and identifier from the run's summary.json.
    lora = tmp_path / "lora"
    assert cli.main(quick_train(tiny_model_dir, instance_dir, lora, "--use_lora", "--learning_rate", "1e-2")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"next: python -m dreambooth_lib sample {lora} --prompt") and "{identifier} = sks" in last
    assert cli.main(["sample", str(lora), "--prompt", "a photo of {identifier} {class_noun}",
                     "--out", str(tmp_path / "run.png"), *common]) == 0
    assert cli.main(["sample", "--model", str(tiny_model_dir), "--lora_dir", str(lora), "--prompt", "a photo of sks dog",
                     "--out", str(tmp_path / "flags.png"), *common]) == 0
    assert np.array_equal(grid_pixels(tmp_path / "run.png"), grid_pixels(tmp_path / "flags.png"))
    assert json.loads((tmp_path / "run.json").read_text())["prompts"] == ["a photo of sks dog"]
    # ... and not the base model's images (the LoRA was loaded).
    assert cli.main(["sample", "--model", str(tiny_model_dir), "--prompt", "a photo of sks dog",
                     "--out", str(tmp_path / "base.png"), *common]) == 0
    assert not np.array_equal(grid_pixels(tmp_path / "run.png"), grid_pixels(tmp_path / "base.png"))

    # Full fine-tune: the run folder is the pipeline.
    full = tmp_path / "full"
    assert cli.main(quick_train(tiny_model_dir, instance_dir, full, "--learning_rate", "1e-2")) == 0
    assert cli.main(["sample", str(full), "--prompt", "a {identifier} {class_noun}", "--out", str(tmp_path / "f1.png"), *common]) == 0
    assert cli.main(["sample", "--model", str(full), "--prompt", "a sks dog", "--out", str(tmp_path / "f2.png"), *common]) == 0
    assert np.array_equal(grid_pixels(tmp_path / "f1.png"), grid_pixels(tmp_path / "f2.png"))
    # A run is sampled at the side it trained at; --resolution asks for another
    side = json.loads((full / "summary.json").read_text())["config"]["resolution"]
    assert Image.open(tmp_path / "f1.png").size == (2 * side, side)
    assert cli.main(["sample", str(full), "--prompt", "a sks dog", "--out", str(tmp_path / "f3.png"), "--resolution",
                     str(2 * side), *common]) == 0
    assert Image.open(tmp_path / "f3.png").size == (4 * side, 2 * side)


def test_sample_refuses_what_is_not_a_run(tiny_model_dir, instance_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["sample", str(tmp_path / "empty"), "--prompt", "a dog"]) == 2
    assert "is not a training run: expected train's output_dir" in capsys.readouterr().err
    assert cli.main(["sample", str(tiny_model_dir), "--prompt", "a dog"]) == 2  # a pipeline: say to pass it as --model
    assert "is a diffusers pipeline, not a run: pass it with --model" in capsys.readouterr().err
    assert cli.main(["sample", "--model", str(tiny_model_dir), "--prompt", "a {identifier} dog"]) == 2  # nothing fills it
    assert "uses {identifier}, which has no value here" in capsys.readouterr().err

    # A LoRA run whose base model was moved away.
    import shutil
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    run = tmp_path / "run"
    assert cli.main(quick_train(base, instance_dir, run, "--use_lora", "--no_with_prior_preservation")) == 0
    base.rename(tmp_path / "moved")
    capsys.readouterr()
    assert cli.main(["sample", str(run), "--prompt", "a {identifier} dog"]) == 2
    assert f"was trained on the base model {base}, which is not there any more: pass where it is now with --model" \
        in capsys.readouterr().err
    assert cli.main(["sample", str(run), "--model", str(tmp_path / "moved"), "--prompt", "a {identifier} dog",
                     "--num_inference_steps", "1", "--seeds", "0", "--out", str(tmp_path / "g.png")]) == 0


def test_a_cli_run_prints_no_third_party_warning_and_says_what_comes(tiny_model_dir, instance_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "dreambooth_lib",  # 4 sampler and training steps: time estimates
                           *quick_train(tiny_model_dir, instance_dir, tmp_path / "run", "--use_lora",
                                        "--class_inference_steps", "4", "--max_train_steps", "4")],
                          capture_output=True, text=True, check=True)
    sampled = subprocess.run([sys.executable, "-m", "dreambooth_lib", "sample", str(tmp_path / "run"), "--prompt",
                              "a {identifier} {class_noun}", "--seeds", "0", "--num_inference_steps", "2",
                              "--out", str(tmp_path / "grid.png")], capture_output=True, text=True, check=True)
    output = done.stdout + done.stderr + sampled.stdout + sampled.stderr
    for noise in ("[transformers]", "torchvision", "kernels-community", "Loading pipeline components", "Loading weights",
                  "No LoRA keys associated"):  # the last: diffusers on a LoRA without text-encoder weights
        assert noise not in output, noise
    lines = [line.split("\r")[-1] for line in done.stdout.splitlines()]
    order = [next(i for i, line in enumerate(lines) if line.startswith(start)) for start in (
        "plan: LoRA rank 4", "generating 2 class images", "class images: 2 per sampler call (auto:",
        "training: about")]
    assert order == sorted(order)
    assert "class images: about" in done.stdout  # after the first sampler steps (printed inside the progress bar)
    assert lines[-1].startswith(f"next: python -m dreambooth_lib sample {tmp_path / 'run'} --prompt")
    assert lines[-2].startswith(f"run folder: weights {tmp_path / 'run' / 'pytorch_lora_weights.safetensors'}")


def long_flags(parser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def every_command_parser() -> dict:
    """{command: its parser} of python -m dreambooth_lib ... and python -m dreambooth_lib.toyworld ..."""
    import argparse

    from dreambooth_lib import evaluate
    from dreambooth_lib.toyworld import __main__ as toyworld

    found = {"evaluate": evaluate.build_parser()}
    for prefix, parser in (("", cli.build_parser()), ("toyworld ", toyworld.build_parser())):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        found |= {prefix + name: p for name, p in sub.choices.items() if name != "evaluate"}
    return found


def test_one_flag_spelling_across_sub_commands_and_dashes_accepted():
    parsers = every_command_parser()
    assert set(parsers) == {"train", "class-images", "sample", "export-lora", "evaluate", "toyworld pretrain",
                            "toyworld oracle-train", "toyworld oracle-eval", "toyworld base-eval", "toyworld demo",
                            "toyworld ablate", "toyworld bench", "toyworld pretrain-flow"}
    spellings = {}
    for name, parser in parsers.items():
        shown = parser.format_help()  # what --help prints
        for flag in long_flags(parser):
            assert flag in shown, (name, flag)
            assert "-" not in flag[2:], f"{name}: {flag} is not snake_case"
            spellings.setdefault(flag.replace("_", ""), set()).add(flag)
    assert all(len(s) == 1 for s in spellings.values()), [s for s in spellings.values() if len(s) > 1]
    for shared in ("--output_dir", "--class_noun", "--instance_dir", "--guidance_scale", "--num_inference_steps",
                   "--vae_model", "--lora_dir", "--identifier", "--max_train_steps", "--images_dir", "--batch_size"):
        assert len([n for n, p in parsers.items() if shared in long_flags(p)]) >= 2, shared

    # The dashed spelling (what evaluate and the toy world used) is an alias: the same parse.
    def same(command, snake, dashed):
        parser = parsers[command]
        assert vars(parser.parse_args(dashed)) == vars(parser.parse_args(snake)), command

    same("train", ["--class_noun", "dog", "--no_center_crop", "--output_dir", "x", "--use_lora"],
         ["--class-noun", "dog", "--no-center-crop", "--output-dir=x", "--use-lora"])
    same("train", ["--no_center_crop"], ["--no-center_crop"])  # argparse's own negative spelling, as before
    same("evaluate", ["r", "--instance_dir", "p", "--class_noun", "dog", "--n_per_prompt", "2", "--lora_dir", "l"],
         ["r", "--subject-dir", "p", "--class-noun", "dog", "--n-per-prompt", "2", "--lora", "l"])
    same("sample", ["r", "--prompt", "a", "--guidance_scale", "3", "--lora_dir", "l"],
         ["r", "--prompt", "a", "--guidance-scale", "3", "--lora-dir", "l"])
    same("toyworld demo", ["--output_dir", "o", "--images_dir", "i", "--max_train_steps", "5"],
         ["--output-dir", "o", "--images-dir", "i", "--steps", "5"])
    same("toyworld base-eval", ["--guidance_scale", "3", "--num_inference_steps", "4"],
         ["--guidance-scale", "3", "--steps", "4"])
    same("toyworld pretrain", ["--vae_steps", "3", "--batch_size", "2", "--learning_rate", "1"],
         ["--vae-steps", "3", "--batch-size", "2", "--lr", "1"])
    assert cli.build_parser().parse_args(["train", "--no-use-lora"]).use_lora is False  # through the top-level parser


def test_class_images_match_a_separate_vae_by_its_weights(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from dreambooth_lib.tiny import tiny_vae

    monkeypatch.chdir(tiny_model_dir.parent)
    out = tmp_path / "run"
    common = ["--pretrained_model", str(tiny_model_dir), "--class_noun", "dog", "--resolution", "32",
              "--num_class_images", "2", "--class_inference_steps", "1", "--output_dir", str(out)]
    # The VAE named by a relative path, then by its absolute path: the same weights, the images are reused.
    assert cli.main(["class-images", "--vae_model", tiny_model_dir.name, *common]) == 0
    assert "generating 2 class images" in capsys.readouterr().out
    images = sorted((out / "class_images").glob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in images]
    assert cli.main(["class-images", "--vae_model", str(tiny_model_dir), *common]) == 0
    assert "generating" not in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in images] == stamps
    # Another VAE (other weights, same architecture): a user's class_dir made with the first is refused.
    other = tmp_path / "other_vae"
    torch.manual_seed(1)
    vae = tiny_vae(16)  # the tiny pipeline's VAE shape
    vae.save_pretrained(other)
    assert cli.main(["class-images", "--vae_model", str(other), "--class_dir", str(out / "class_images"), *common]) == 2
    err = capsys.readouterr().err
    assert "were made differently (vae_weights: folder has" in err and "Point class_dir to another folder" in err
