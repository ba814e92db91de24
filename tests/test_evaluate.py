"""DreamBench-style protocol: prompt lists, seeded generation, the results table and the CLI."""

import csv
import json

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image
from dreambooth_lib.tiny import save_tiny_clip, save_tiny_dino

from dreambooth_lib import evaluate, metrics
from dreambooth_lib.data import InputError, fill_prompt


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return str(save_tiny_dino(root / "dino")), str(save_tiny_clip(root / "clip"))


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    p = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def test_prompt_lists_follow_the_paper_counts():
    objects, live = evaluate.prompt_set(live=False), evaluate.prompt_set(live=True)
    assert {k: len(v) for k, v in objects.items()} == {"recontextualization": 20, "property": 5}
    assert {k: len(v) for k, v in live.items()} == {"recontextualization": 10, "accessorization": 10, "property": 5}
    for templates in [*objects.values(), *live.values()]:
        assert len(set(templates)) == len(templates)
        assert all("{identifier} {class_noun}" in t for t in templates)
    assert evaluate.prompt_set(live=True, prompt_limit=2)["accessorization"] == live["accessorization"][:2]
    assert fill_prompt(live["property"][0], "sks", "dog") == "a green sks dog"



def test_evaluate_run_table_and_extra_metrics_hook(pipe, encoder_dirs, tmp_path):
    dino = metrics.load_dino(encoder_dirs[0], device="cpu")
    real = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (40, 200)]
    seen = {}

    def oracle(images_by_category):
        seen.update({k: len(v) for k, v in images_by_category.items()})
        return {"overall": {"oracle": 0.5}, "property": {"oracle": 0.25}}

    result = evaluate.evaluate_run(
        pipe, real, "dog", "sks", live=False, encoders=metrics.Encoders(dino=dino), n_per_prompt=2,
        num_inference_steps=2, prompt_limit=2, extra_metrics=oracle, out_dir=tmp_path,
    )
    assert seen == {"recontextualization": 4, "property": 4, "class_prompt": 2}
    rows = result["rows"]
    assert result["columns"] == ["DINO", "CLIP-I", "CLIP-T", "PRES", metrics.DIV_DINO_FALLBACK, "oracle"]
    assert rows["overall"]["oracle"] == 0.5 and rows["property"]["oracle"] == 0.25
    # Overall = all images pooled: equal-size categories -> the plain mean of the two rows.
    assert rows["overall"]["DINO"] == pytest.approx((rows["recontextualization"]["DINO"] + rows["property"]["DINO"]) / 2, abs=1e-12)
    gen = [Image.open(tmp_path / "images" / "property" / f"{p:02d}_seed{s}.png") for p in (0, 1) for s in (0, 1)]
    assert rows["property"]["DINO"] == pytest.approx(metrics.dino_score(gen, real, dino), abs=1e-6)
    assert rows["overall"]["CLIP-T"] is None and rows["overall"]["PRES"] is not None
    assert any("CLIP-I and CLIP-T need a real pretrained CLIP encoder" in m for m in result["missing"])
    with pytest.raises(InputError, match="n_per_prompt"):
        evaluate.evaluate_run(pipe, real, "dog", "sks", False, metrics.Encoders(), n_per_prompt=1)


def test_main_smoke_writes_json_csv_grids(tiny_model_dir, instance_dir, encoder_dirs, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_model_dir), "--subject-dir", str(instance_dir), "--class-noun", "dog",
            "--identifier", "sks", "--live", "--dino", encoder_dirs[0], "--clip", encoder_dirs[1], "--out", str(out), "--smoke"]
    assert evaluate.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["rows"]) == {"recontextualization", "accessorization", "property", "overall"}
    overall = result["rows"]["overall"]
    assert overall["n_images"] == 6 and all(-1 <= overall[c] <= 1 for c in ("DINO", "CLIP-I", "CLIP-T", "PRES"))
    assert result["prompts"]["accessorization"][0]["clip_t_prompt"] == "a dog wearing a knitted green beanie"
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["row"] for r in table if r["source"] == "paper"] == list(evaluate.PAPER_ROWS)
    assert next(r for r in table if r["row"] == "DreamBooth (Stable Diffusion)")["DINO"] == "0.6680"
    for cat in ("recontextualization", "accessorization", "property", "class_prompt"):
        assert Image.open(out / f"grid_{cat}.png").size[0] == 2 * 256
    printed = capsys.readouterr().out
    assert "paper: DreamBooth (Imagen)" in printed and "0.6960" in printed


def test_main_without_encoders_reports_what_it_can(tiny_model_dir, instance_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the default hub ids cannot be fetched: toy world
    argv = ["--model", str(tiny_model_dir), "--subject-dir", str(instance_dir), "--class-noun", "dog",
            "--identifier", "sks", "--out", str(tmp_path), "--smoke"]
    assert evaluate.main(argv) == 0
    err = capsys.readouterr().err
    assert "DINO and PRES need a real pretrained DINO encoder" in err and "CLIP-I and CLIP-T need" in err
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["rows"]["overall"]["DINO"] is None and result["rows"]["overall"]["n_images"] == 4
    assert (tmp_path / "grid_property.png").exists()


def test_main_bad_input_fails_before_generating(tiny_model_dir, instance_dir, tmp_path):
    base = ["--model", str(tiny_model_dir), "--class-noun", "dog", "--identifier", "sks", "--out", str(tmp_path), "--smoke"]
    with pytest.raises(InputError, match="--dino .*does not exist"):
        evaluate.main(base + ["--subject-dir", str(instance_dir), "--dino", str(tmp_path / "missing_dino")])
    with pytest.raises(InputError, match="does not exist"):
        evaluate.main(base + ["--subject-dir", str(tmp_path / "no_photos")])
    assert not (tmp_path / "results.json").exists()


def test_main_on_a_run_folder_equals_the_explicit_flags(tiny_model_dir, instance_dir, encoder_dirs, tmp_path):
    from dreambooth_lib.config import TrainConfig
    from dreambooth_lib.train import train

    run = tmp_path / "run"
    train(TrainConfig(pretrained_model=str(tiny_model_dir), instance_dir=str(instance_dir), class_noun="dog",
                      identifier="sks", resolution=32, with_prior_preservation=False, max_train_steps=2, use_lora=True,
                      learning_rate=1e-2, checkpointing_steps=0, validation_steps=0, output_dir=str(run)),
          log=lambda *a: None, progress=False)
    encoders = ["--dino", encoder_dirs[0], "--clip", encoder_dirs[1], "--smoke"]
    assert evaluate.main([str(run), *encoders]) == 0  # model, LoRA, photos, class noun, identifier: the run's
    assert evaluate.main(["--model", str(tiny_model_dir), "--lora_dir", str(run), "--instance_dir", str(instance_dir),
                          "--class_noun", "dog", "--identifier", "sks", "--resolution", "32", "--out", str(tmp_path / "flags"),
                          *encoders]) == 0
    from_run = json.loads((run / "evaluation" / "results.json").read_text())  # default out: <run>/evaluation
    flags = json.loads((tmp_path / "flags" / "results.json").read_text())
    assert from_run["rows"] == flags["rows"] and from_run["settings"] == flags["settings"]
    assert from_run["settings"]["identifier"] == "sks" and from_run["settings"]["class_noun"] == "dog"
    assert from_run["settings"]["resolution"] == 32  # the run's training side
    with pytest.raises(InputError, match="is not a training run"):
        evaluate.main([str(tmp_path / "flags"), *encoders])
