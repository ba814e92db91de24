"""CLI: every TrainConfig field is a flag; train / sample run end to end; evaluate is delegated."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types

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
