"""Several subjects in one run (subjects.py): config, fair batches, class images per class, resume, CLI, evaluate."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_lib import __main__ as cli
from dreambooth_lib import class_images as CI
from dreambooth_lib import data, evaluate
from dreambooth_lib import step as S
from dreambooth_lib import subjects as SJ
from dreambooth_lib import train as T
from dreambooth_lib import weights as W
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import InputError
from dreambooth_lib.sample import pick_subject, read_run
from dreambooth_lib.tiny import save_tiny_clip, save_tiny_dino

from conftest import train_killed_after_checkpoint, write_photos


@pytest.fixture
def two_subjects(tmp_path) -> list[dict]:
    write_photos(tmp_path / "rex", n=3)
    write_photos(tmp_path / "tom", n=2, size=(40, 48))
    return [dict(name="rex", instance_dir=str(tmp_path / "rex"), class_noun="dog"),
            dict(name="tom", instance_dir=str(tmp_path / "tom"), class_noun="cat")]


def make_cfg(model, subjects, out, **kw) -> TrainConfig:
    base = dict(pretrained_model=str(model), subjects=subjects, output_dir=str(out), resolution=32,
                with_prior_preservation=True, num_class_images=2, class_inference_steps=1, max_train_steps=2,
                learning_rate=1e-3, checkpointing_steps=0, validation_steps=0, train_batch_size=2)
    return TrainConfig(**{**base, **kw})


def test_fair_rows_cycle_subjects_and_pair_each_with_its_own_class():
    # subjects 0 (3 photos) and 2 (1 photo) are dogs (class 0), subject 1 (2 photos) a cat (class 1);
    # class values: 0, 1, 2 dogs, 3, 4 cats.
    layout = SJ.Layout(instance_subject=[0, 0, 0, 1, 1, 2], subject_class=[0, 1, 0], class_of_value=[0, 0, 0, 1, 1],
                       class_prompts=["a dog", "a cat"])
    stream = [row for m in range(12) for row in SJ.fair_rows(layout, 2, seed=5, micro_step=m)]
    subject = [layout.instance_subject[i] for i, _ in stream]
    assert subject == [0, 1, 2] * 8  # rows cycle the subjects evenly
    for i, j in stream:
        assert layout.class_of_value[j] == layout.subject_class[layout.instance_subject[i]]
    # each subject's photos once per epoch of that subject: subject 0 (3 photos) drawn 8 times
    draws = [i for i, _ in stream if layout.instance_subject[i] == 0]
    assert sorted(draws[:3]) == sorted(draws[3:6]) == [0, 1, 2]
    # class streams: the dogs' 16 class rows use the 3 dog images evenly (5 or 6 each), the cat's 8 rows 4 each
    assert sorted(Counter(j for i, j in stream if layout.instance_subject[i] != 1).values()) == [5, 5, 6]
    assert Counter(j for i, j in stream if layout.instance_subject[i] == 1) == {3: 4, 4: 4}
    # two processes deal the same stream: micro-step m of rank r = one-process positions of micro-step 2m + r
    for m in range(3):
        for rank in range(2):
            assert SJ.fair_rows(layout, 2, 5, m, rank, 2) == SJ.fair_rows(layout, 2, 5, 2 * m + rank)
    other = [row for m in range(12) for row in SJ.fair_rows(layout, 2, seed=6, micro_step=m)]
    assert other != stream  # the seed orders the draws


def test_two_subject_run_has_distinct_identifiers_fair_batches_and_class_images_per_class(tiny_model_dir, two_subjects,
                                                                                           tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, two_subjects, out, train_text_encoder=True)
    seen, lines = [], []
    real_encode = S.encode_prompts
    monkeypatch.setattr(S, "encode_prompts", lambda models, prompts, *rest: seen.append(list(prompts)) or real_encode(models, prompts, *rest))
    summary = T.train(cfg, log=lines.append, progress=False)

    records = summary["subjects"]
    assert [r["name"] for r in records] == ["rex", "tom"] and [r["class_noun"] for r in records] == ["dog", "cat"]
    rex, tom = (r["identifier"] for r in records)
    assert rex and tom and rex != tom and {rex, tom}.isdisjoint({"dog", "cat"})
    assert records[0]["instance_prompt"] == f"a photo of {rex} dog" and records[1]["instance_prompt"] == f"a photo of {tom} cat"
    for name, identifier in (("rex", rex), ("tom", tom)):  # the log reports each picked identifier
        assert any(line.startswith(f"subject '{name}': identifier '{identifier}'") for line in lines)
    # each micro-batch: one row per subject, each followed in the class half by its own class's prompt
    assert len(seen) == 2
    for prompts in seen:
        assert prompts == [f"a photo of {rex} dog", f"a photo of {tom} cat", "a photo of a dog", "a photo of a cat"]
    # class images made once per class noun, in a folder of their own
    for noun in ("dog", "cat"):
        folder = out / "class_images" / noun
        assert len(list(folder.glob("*.png"))) == 2
        assert json.loads((folder / CI.MANIFEST_NAME).read_text())["class_prompt"] == f"a photo of a {noun}"
    assert summary["num_class_images"] == 4
    saved = json.loads((out / "summary.json").read_text())
    assert saved["subjects"] == records and saved["identifier"] is None
    # the run folder: read_run knows the subjects; a prompt with {identifier} needs --subject
    run = read_run(out)
    assert pick_subject(run, "tom").identifier == tom and pick_subject(run, "tom").class_noun == "cat"
    with pytest.raises(InputError, match=f"--subject NAME, one of: rex \\({rex} dog\\); tom \\({tom} cat\\)"):
        pick_subject(run, None)
    with pytest.raises(InputError, match="no such subject"):
        pick_subject(run, "felix")
    assert cli.main(["sample", str(out), "--prompt", "a photo of {identifier} {class_noun}", "--seeds", "0",
                     "--num_inference_steps", "1", "--out", str(tmp_path / "none.png")]) == 2
    assert cli.main(["sample", str(out), "--subject", "tom", "--prompt", "a photo of {identifier} {class_noun}",
                     "--seeds", "0", "--num_inference_steps", "1", "--out", str(tmp_path / "tom.png")]) == 0
    assert json.loads((tmp_path / "tom.json").read_text())["prompts"] == [f"a photo of {tom} cat"]


def test_class_rows_are_images_of_their_subjects_class(tiny_model_dir, two_subjects, tmp_path, monkeypatch):
    # class images made for the dog and the cat are told apart by their values: each class row of every
    # batch must be one of its instance row's class images.
    cfg = make_cfg(tiny_model_dir, two_subjects, tmp_path / "run", cache_latents=False, max_train_steps=3)
    batches, real = [], S.latents_and_conditioning
    monkeypatch.setattr(S, "latents_and_conditioning", lambda batch, *a, **k: batches.append(batch) or real(batch, *a, **k))
    captured = {}
    real_dataset = SJ.SubjectsDataset.__init__

    def keep(self, *a, **k):
        real_dataset(self, *a, **k)
        captured["dataset"] = self

    monkeypatch.setattr(SJ.SubjectsDataset, "__init__", keep)
    T.train(cfg, log=lambda *a: None, progress=False)
    ds = captured["dataset"]
    by_class = {0: [v for v, c in zip(ds.class_values, ds.layout.class_of_value) if c == 0],
                1: [v for v, c in zip(ds.class_values, ds.layout.class_of_value) if c == 1]}
    assert len(by_class[0]) == len(by_class[1]) == 2 and not torch.equal(by_class[0][0], by_class[1][0])
    for batch in batches:
        n = len(batch["prompts"]) // 2
        for row in range(n):
            subject = next(s for s, v in zip(ds.layout.instance_subject, ds.instance_values) if torch.equal(v, batch["values"][row]))
            klass = ds.layout.subject_class[subject]
            assert any(torch.equal(batch["values"][n + row], v) for v in by_class[klass])
            assert not any(torch.equal(batch["values"][n + row], v) for v in by_class[1 - klass])
            assert batch["prompts"][n + row] == ds.layout.class_prompts[klass]


def test_two_subject_resume_equals_uninterrupted(tiny_model_dir, two_subjects, tmp_path, monkeypatch):
    common = dict(max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear", use_lora=True, train_text_encoder=True,
                  lora_dropout=0.1, class_dir=str(tmp_path / "class"))
    whole = T.train(make_cfg(tiny_model_dir, two_subjects, tmp_path / "whole", **common), log=lambda *a: None, progress=False)
    cut = tmp_path / "cut"
    train_killed_after_checkpoint(monkeypatch, make_cfg(tiny_model_dir, two_subjects, cut, **common), 2,
                                  log=lambda *a: None, progress=False)
    resumed = T.train(make_cfg(tiny_model_dir, two_subjects, cut, resume="latest", **common), log=lambda *a: None,
                      progress=False)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == 4
    assert [h["loss"] for h in resumed["loss_history"]] == pytest.approx([h["loss"] for h in whole["loss_history"]], abs=1e-6)
    a, b = load_file(tmp_path / "whole" / W.LORA_WEIGHTS), load_file(cut / W.LORA_WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert (tmp_path / "class" / "dog").is_dir() and (tmp_path / "class" / "cat").is_dir()  # class_dir/<class noun>


def test_one_subject_batches_are_todays(tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    # subjects=None: the data set and batch_indices as before (rows i = batch_indices, class row i % n_class)
    cfg = TrainConfig(pretrained_model=str(tiny_model_dir), instance_dir=str(instance_dir), class_noun="dog",
                      identifier="sks", output_dir=str(tmp_path / "run"), resolution=32, num_class_images=3,
                      class_inference_steps=1, max_train_steps=3, train_batch_size=3, learning_rate=1e-3,
                      checkpointing_steps=0, validation_steps=0, cache_latents=False)
    batches, real = [], S.latents_and_conditioning
    monkeypatch.setattr(S, "latents_and_conditioning", lambda batch, *a, **k: batches.append(batch) or real(batch, *a, **k))
    captured = {}
    real_prepare = T.prepare_training
    monkeypatch.setattr(T, "prepare_training", lambda *a, **k: captured.setdefault("state", real_prepare(*a, **k)))
    T.train(cfg, log=lambda *a: None, progress=False)
    ds = captured["state"].dataset
    assert type(ds) is data.DreamBoothDataset and len(ds) == 4
    for m, batch in enumerate(batches):
        idx = S.batch_indices(4, 3, cfg.seed, m)
        assert batch["prompts"] == ["a photo of sks dog"] * 3 + ["a photo of a dog"] * 3
        expected = [ds.instance_values[i] for i in idx] + [ds.class_values[i % 3] for i in idx]
        assert torch.equal(batch["values"], torch.stack(expected))


def test_bad_subjects_are_refused_before_any_model_work(tiny_model_dir, two_subjects, tmp_path, monkeypatch):
    def no_models(*a, **k):
        raise AssertionError("model work started")

    monkeypatch.setattr(T, "load_tokenizer", no_models)
    monkeypatch.setattr(T, "load_models", no_models)
    rex, tom = two_subjects
    cases = [
        ([rex, dict(tom, instance_dir=str(tmp_path / "gone"))], "subject 'tom': instance_dir .*gone does not exist"),
        ([dict(rex, identifier="sks"), dict(tom, identifier="sks")], "subjects 'rex' and 'tom' have the same identifier 'sks'"),
        ([rex, dict(tom, class_noun="")], "subject 'tom' has no class_noun"),
        ([rex, dict(tom, name="rex")], "two subjects are named 'rex'"),
        ([rex, dict(tom, colour="grey")], r"subject 'tom' has unknown keys \['colour'\]"),
        ([rex, dict(tom, identifier="two words")], "subject 'tom': identifier = 'two words' must be one word"),
        ([], "non-empty list"),
    ]
    for subjects, message in cases:
        with pytest.raises(InputError, match=message):
            T.train(make_cfg(tiny_model_dir, subjects, tmp_path / "run"), progress=False)
    with pytest.raises(InputError, match="either subjects or instance_dir"):
        T.train(make_cfg(tiny_model_dir, two_subjects, tmp_path / "run", class_noun="dog"), progress=False)
    assert not (tmp_path / "run").exists()
    # no prior: no class noun needed
    cfg = make_cfg(tiny_model_dir, [rex, dict(tom, class_noun="")], tmp_path / "run", with_prior_preservation=False)
    from dreambooth_lib.validate import validate_config
    validate_config(cfg)


def test_cli_reads_subjects_json(tiny_model_dir, two_subjects, tmp_path, capsys):
    path = tmp_path / "subjects.json"
    path.write_text(json.dumps(two_subjects))
    args = cli.build_parser().parse_args(["train", "--subjects", str(path), "--output_dir", str(tmp_path / "run")])
    assert cli.config_from_args(args).subjects == two_subjects
    assert cli.main(["train", "--subjects", str(tmp_path / "missing.json"), "--pretrained_model", str(tiny_model_dir)]) == 2
    assert "--subjects " in (err := capsys.readouterr().err) and "missing.json does not exist" in err
    path.write_text(json.dumps([two_subjects[0], dict(two_subjects[1], identifier="sks"), dict(two_subjects[0], name="x", identifier="sks")]))
    assert cli.main(["train", "--subjects", str(path), "--pretrained_model", str(tiny_model_dir)]) == 2
    assert "same identifier 'sks'" in capsys.readouterr().err


def test_evaluate_reports_each_subject_of_a_run(tiny_model_dir, two_subjects, tmp_path, capsys):
    out = tmp_path / "run"
    summary = T.train(make_cfg(tiny_model_dir, two_subjects, out, with_prior_preservation=False, use_lora=True),
                      log=lambda *a: None, progress=False)
    dino, clip = save_tiny_dino(tmp_path / "dino"), save_tiny_clip(tmp_path / "clip")
    assert evaluate.main([str(out), "--dino", str(dino), "--clip", str(clip), "--smoke"]) == 0
    printed = capsys.readouterr().out
    for record in summary["subjects"]:
        result = json.loads((out / "evaluation" / record["name"] / "results.json").read_text())
        assert result["settings"]["identifier"] == record["identifier"]
        assert result["settings"]["class_noun"] == record["class_noun"]
        assert result["settings"]["n_real_images"] == len(data.load_instance_images(record["instance_dir"], 0))
        assert result["rows"]["overall"]["DINO"] is not None
        assert f"subject {record['name']} ({record['identifier']} {record['class_noun']}):" in printed
    from safetensors import safe_open
    from dreambooth_lib.export import export_lora
    with safe_open(export_lora(out, None, "kohya"), "pt") as f:  # the exported LoRA names every subject's trigger
        comment = f.metadata()["ss_training_comment"]
    for record in summary["subjects"]:
        assert f"'{record['identifier']} {record['class_noun']}'" in comment
    assert evaluate.main([str(out), "--subject", "tom", "--dino", str(dino), "--clip", str(clip), "--smoke", "--out", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "results.json").read_text())["settings"]["class_noun"] == "cat"


def test_class_images_command_makes_each_class_once_and_train_reuses_them(tiny_model_dir, two_subjects, tmp_path, capsys):
    subjects = two_subjects + [dict(name="max", instance_dir=two_subjects[0]["instance_dir"], class_noun="dog")]
    path = tmp_path / "subjects.json"
    path.write_text(json.dumps(subjects))
    out = tmp_path / "run"
    flags = ["--subjects", str(path), "--pretrained_model", str(tiny_model_dir), "--output_dir", str(out),
             "--resolution", "32", "--num_class_images", "2", "--class_inference_steps", "1"]
    assert cli.main(["class-images", *flags]) == 0
    printed = capsys.readouterr().out
    assert printed.count("2 class images in") == 2  # dog (rex and max) and cat
    assert sorted(p.name for p in (out / "class_images").iterdir()) == ["cat", "dog"]
    made = {p: p.read_bytes() for p in (out / "class_images").rglob("*.png")}
    lines = []
    T.train(make_cfg(tiny_model_dir, subjects, out, max_train_steps=1, train_batch_size=3), log=lines.append, progress=False)
    assert not any("generating" in line for line in lines)  # the command's images were reused
    assert {p: p.read_bytes() for p in (out / "class_images").rglob("*.png")} == made
