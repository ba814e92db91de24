"""The toy bench (toyworld/bench.py): resume, the report's intervals, the wrong noun, multi-subject records.

Training, rendering and the oracle are replaced by fakes whose outputs are written by hand (a picture
carries the labels the fake oracle reads back), so every metric below is known in advance; the
real pieces (train, sampling, oracle) have their own tests and the bench's smoke run is in docs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth_lib import data
from dreambooth_lib.errors import InputError
from dreambooth_lib.subjects import subjects_of
from dreambooth_lib.toyworld import __main__ as toy_cli
from dreambooth_lib.toyworld import bench, demo, render, stats
from dreambooth_lib.toyworld import oracle as oracle_lib

A, B = "marked_star", "banded_star"  # a look-alike pair: trained together by multi_subject


HEADS = ("subject", "class", "colour", "context", "style")


def picture(subject="none", feature=0.0, **labels) -> Image.Image:
    """A stand-in picture carrying what the fake oracle will say about it (default: a plain yellow star on grass)."""
    im = Image.new("RGB", (4, 4))
    im.info.update({"class": "star", "colour": "yellow", "context": "grass", "style": "photo", **labels},
                   subject=subject, feature=feature)
    return im


class FakeOracle:
    """Reads back the labels a `picture` carries."""

    def predict(self, images):
        return [{k: im.info[k] for k in HEADS} for im in images]

    def features(self, images):
        return torch.tensor([[1.0, im.info["feature"]] for im in images])


def fake_pictures(who: list[str]):
    """render_pictures' stand-in: each prompt's 8 pictures show the subjects `who` (in that order), as the
    prompt asks (prompt fidelity 1); the class prompt's 32 pictures are plain stars on grass."""
    def render_pictures(pipe, subject, phrase, guidance_scale):
        suites = {}
        for category, items in oracle_lib.prompt_suite(subject).items():
            suites[category] = [dict(prompt=t.replace("{identifier} star", phrase), expected=dict(e),
                                     images=[picture(s, k % 2, **e) for k, s in enumerate(who)])
                                for t, e in items]
        return suites, [picture() for _ in range(32)]
    return render_pictures


class FakeTrain:
    """train's stand-in: counts calls, writes a weights file and summary.json; `fail_at` = the call that is
    killed mid-training (its folder holds a partial file and no summary)."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, cfg, log=print, progress=True):
        self.calls.append(cfg)
        out = Path(cfg.output_dir)
        (out / "unet").mkdir(parents=True)  # fails if an interrupted run's folder was not cleared
        (out / "unet" / "weights.safetensors").write_bytes(b"w")
        if len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("killed")
        summary = dict(config=cfg.to_dict(), steps=cfg.max_train_steps, final_loss=0.01 * len(Path(cfg.output_dir).parent.name),
                       wall_time_s=1.0, seconds_per_step=0.01, optimizer="adamw")
        if cfg.subjects:
            summary["subjects"] = [dict(name=s["name"], identifier=word, class_noun=s["class_noun"],
                                        instance_prompt=f"a photo of {word} {s['class_noun']}")
                                   for s, word in zip(cfg.subjects, ("gtc", "pkx"))]
        else:
            summary.update(identifier="gtc", instance_prompt=data.build_prompts(cfg, "gtc")[0])
        (out / "summary.json").write_text(json.dumps(summary))
        return summary


@pytest.fixture
def fakes(monkeypatch):
    def install(train, who=(A,) * 6 + (B, "none")):
        monkeypatch.setattr(bench, "train", train)
        monkeypatch.setattr(bench, "render_pictures", fake_pictures(list(who)))
        monkeypatch.setattr(bench, "base_class_pictures", lambda model, subjects, guidance_scale: {
            "star": [picture(context="night")] * 16 + [picture(context="grass")] * 16})
        monkeypatch.setattr(demo, "load_tuned", lambda cfg: cfg)  # the 'pipeline' render_pictures gets: its config
    return install


def comparable(record: dict, root: Path) -> dict:
    """A record without what differs between two benches of the same runs: wall times and the root folder."""
    text = json.dumps({k: v for k, v in record.items() if k != "wall_time_s"}).replace(str(root), "ROOT")
    return json.loads(text)


def test_interrupted_bench_resumes_without_redoing_finished_runs(tmp_path, fakes):
    kw = dict(subjects=[A, B], seeds=[0], recipes=["prior", "no_prior"], oracle=FakeOracle(), log=lambda *a: None)
    whole = FakeTrain()
    fakes(whole)
    bench.run_bench(tmp_path / "whole", **kw)
    assert [(Path(c.output_dir).parts[-3:]) for c in whole.calls] == [
        ("prior", A, "seed0"), ("prior", B, "seed0"), ("no_prior", A, "seed0"), ("no_prior", B, "seed0")]

    cut = FakeTrain(fail_at=3)
    fakes(cut)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(tmp_path / "cut", **kw)
    runs = tmp_path / "cut" / "runs"
    assert sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*.json") if p.name.startswith("seed")) == [
        f"prior/{B}/seed0.json", f"prior/{A}/seed0.json"]  # sorted by name
    assert (runs / "no_prior" / A / "seed0" / "unet" / "weights.safetensors").is_file()  # the killed run's leftovers
    for subject in (A, B):  # finished runs keep only their summary (weights dropped once scored)
        assert [p.name for p in (runs / "prior" / subject / "seed0").iterdir()] == ["summary.json"]

    resumed = FakeTrain()
    fakes(resumed)
    bench.run_bench(tmp_path / "cut", **kw)
    assert [(Path(c.output_dir).parts[-3:]) for c in resumed.calls] == [("no_prior", A, "seed0"), ("no_prior", B, "seed0")]
    for recipe in ("prior", "no_prior"):
        for subject in (A, B):
            got, want = (json.loads(bench.record_path(tmp_path / r, recipe, subject, 0).read_text()) for r in ("cut", "whole"))
            assert comparable(got, tmp_path / "cut") == comparable(want, tmp_path / "whole")
    again = FakeTrain()
    fakes(again)
    bench.run_bench(tmp_path / "cut", **kw)
    assert again.calls == []  # everything finished: nothing trains, the report is rebuilt


def test_a_run_killed_after_its_record_loses_its_weights_on_the_next_bench(tmp_path, fakes, monkeypatch):
    kw = dict(subjects=[A], seeds=[0], recipes=["prior", "multi_subject"], max_train_steps=3, oracle=FakeOracle(),
              log=lambda *a: None)
    fakes(FakeTrain())
    drop = bench.drop_weights

    def killed(folder):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(bench, "drop_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(tmp_path, **kw)  # killed between the single run's record and its weights' deletion
    single = bench.record_path(tmp_path, "prior", A, 0)
    assert single.is_file() and (single.with_suffix("") / "unet" / "weights.safetensors").is_file()
    monkeypatch.setattr(bench, "drop_weights", drop)
    again = FakeTrain()
    fakes(again)
    bench.run_bench(tmp_path, **kw)
    assert [Path(c.output_dir).parts[-3] for c in again.calls] == ["multi_subject"]  # the single run is not redone
    pair = tmp_path / "runs" / "multi_subject" / f"{A}+{B}" / "seed0"
    for folder in (single.with_suffix(""), pair):
        assert [p.name for p in folder.iterdir()] == ["summary.json"], folder
    kept = tmp_path / "kept"  # with keep_weights, nothing is dropped
    fakes(FakeTrain())
    bench.run_bench(kept, keep_weights=True, **kw)
    assert (bench.record_path(kept, "prior", A, 0).with_suffix("") / "unet" / "weights.safetensors").is_file()


def test_scores_are_the_oracle_shares_of_the_pictures(tmp_path, fakes):
    fakes(FakeTrain())
    bench.run_bench(tmp_path, subjects=[A], seeds=[0], recipes=["prior"], oracle=FakeOracle(), log=lambda *a: None)
    m = json.loads(bench.record_path(tmp_path, "prior", A, 0).read_text())["metrics"]
    assert m["subject_fidelity"] == m["recontext_subject_fidelity"] == 6 / 8
    assert m["cross_talk"] == 1 / 8  # B is A's multi-subject partner, the baseline in a single run
    assert m["recontext_context_followed"] == 1.0 and m["pres"] == 0.0
    assert m["class_context_shift"] == 0.5  # base: night 1/2, grass 1/2; tuned: grass 1
    # DIV: features (1, 0) and (1, 1) alternate: 4 x 4 of the 28 pairs differ, each by 1 - cos = 1 - 1/sqrt(2)
    assert m["div"] == pytest.approx(16 / 28 * (1 - 1 / math.sqrt(2)))


def test_wrong_class_noun_is_a_fixed_other_class_and_the_run_says_which(tmp_path, fakes, monkeypatch):
    for subject, spec in render.SUBJECTS.items():
        noun = bench.wrong_class_noun(subject)
        assert noun in render.CLASSES and noun != spec["cls"]
    assert bench.wrong_class_noun("marked_star") == "ball"  # the ablation's choice for the demo subject
    train = FakeTrain()
    fakes(train)
    seen = []
    real = bench.render_pictures
    monkeypatch.setattr(bench, "render_pictures", lambda pipe, subject, phrase, g: seen.append(phrase) or real(pipe, subject, phrase, g))
    bench.run_bench(tmp_path, subjects=[A], seeds=[1], recipes=["wrong_class_noun", "no_class_noun"],
                    oracle=FakeOracle(), log=lambda *a: None)
    wrong = json.loads(bench.record_path(tmp_path, "wrong_class_noun", A, 1).read_text())
    assert (wrong["class_noun"], wrong["true_class"], wrong["instance_prompt"]) == ("ball", "star", "a photo of gtc ball")
    assert not wrong["config"]["with_prior_preservation"] and wrong["config"]["seed"] == 1
    assert seen == ["gtc ball", "gtc"]  # prompts name the subject as it was trained
    assert json.loads(bench.record_path(tmp_path, "no_class_noun", A, 1).read_text())["instance_prompt"] == "a photo of gtc"


def test_multi_subject_pairs_cover_every_subject_once_lookalikes_first():
    pairs = bench.multi_subject_pairs()
    assert sorted(s for p in pairs for s in p) == sorted(render.SUBJECTS)
    assert pairs[:len(render.lookalike_pairs())] == render.lookalike_pairs()
    assert bench.partner(A) == B and bench.partner(B) == A


def test_multi_subject_run_writes_one_record_per_subject_with_its_cross_talk(tmp_path, fakes, monkeypatch):
    train = FakeTrain()
    fakes(train)
    who = {"gtc star": [A] * 6 + [B, "none"], "pkx star": [B] * 5 + [A, A, "none"]}  # the pair's, by identifier
    monkeypatch.setattr(bench, "render_pictures", lambda pipe, subject, phrase, g: fake_pictures(
        who[phrase] if pipe.subjects else [subject] * 8)(pipe, subject, phrase, g))  # single runs: only the subject
    bench.run_bench(tmp_path, subjects=[A], seeds=[0], recipes=["prior", "multi_subject"], max_train_steps=3,
                    oracle=FakeOracle(), log=lambda *a: None)
    pair_cfg = train.calls[-1]
    assert [s["name"] for s in pair_cfg.subjects] == [A, B] and pair_cfg.max_train_steps == 6  # 2 x a single run's
    assert pair_cfg.with_prior_preservation and all(s["identifier"] is None for s in pair_cfg.subjects)
    # one class-image folder per (class, seed), the same for the single and the two-subject runs
    assert [s.cfg.class_dir for s in subjects_of(pair_cfg)] == [train.calls[0].class_dir] * 2
    assert train.calls[0].class_dir == str(tmp_path / "class_images" / "seed0" / "star")

    a, b = (json.loads(bench.record_path(tmp_path, "multi_subject", s, 0).read_text()) for s in (A, B))
    assert (a["identifier"], b["identifier"], a["pair"], b["partner"]) == ("gtc", "pkx", [A, B], A)
    assert a["metrics"]["cross_talk"] == 1 / 8 and b["metrics"]["cross_talk"] == 2 / 8
    assert a["metrics"]["subject_fidelity"] == 6 / 8 and b["metrics"]["subject_fidelity"] == 5 / 8
    assert not (tmp_path / "runs" / "multi_subject" / f"{A}+{B}" / "seed0" / "unet").exists()  # weights dropped
    runs = bench.load_records(tmp_path)
    prior_a = json.loads(bench.record_path(tmp_path, "prior", A, 0).read_text())
    assert prior_a["metrics"]["cross_talk"] == 0.0
    report = json.loads((tmp_path / "report" / "toy_bench_runs.json").read_text())
    assert report["cross_talk"][0] == dict(subject=A, called=B, multi_subject=dict(mean=1 / 8, seeds=1),
                                           prior=dict(mean=0.0, seeds=1))
    assert len(runs) == 3 and report["paired"]["multi_subject - prior"]["cross_talk"] == dict(
        mean=1 / 8, low=None, high=None, n=1)  # B has no prior run: one subject paired, no interval


def record(recipe, subject, seed, **metrics):
    full = {m: 0.5 for m in bench.METRICS}
    return dict(recipe=recipe, subject=subject, seed=seed, metrics={**full, **metrics}, wall_time_s=10.0 + seed)


def test_report_intervals_are_stats_values_and_one_subject_gets_none(tmp_path):
    subjects = [A, B, "cross_cube"]
    runs = [record("prior", s, k, pres=0.1 * (i + 1) + 0.02 * k) for i, s in enumerate(subjects) for k in (0, 1)]
    runs += [record("no_prior", s, k, pres=0.9 - 0.1 * i + 0.01 * k) for i, s in enumerate(subjects) for k in (0, 1)]
    runs += [record("lora", A, k, pres=0.2) for k in (0, 1)]
    for r in runs:
        path = bench.record_path(tmp_path, r["recipe"], r["subject"], r["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    out = tmp_path / "out"
    assert toy_cli.main(["bench", "--report_only", "--output_dir", str(tmp_path), "--images_dir", str(out)]) == 0
    report = json.loads((out / "toy_bench_runs.json").read_text())
    # prior's PRES per subject (mean over seeds): 0.11, 0.21, 0.31 -> mean 0.21, sd 0.1, t(0.975, 2) = 4.302653
    prior = report["summary"]["prior"]["pres"]
    assert prior == stats.recipe_interval(runs, "prior", "pres").as_dict()
    assert prior["mean"] == pytest.approx(0.21) and prior["high"] - prior["mean"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3))
    paired = report["paired"]["no_prior - prior"]["pres"]
    assert paired == stats.paired_difference(runs, "prior", "no_prior", "pres").as_dict()
    assert paired["mean"] == pytest.approx((0.905 - 0.11 + 0.805 - 0.21 + 0.705 - 0.31) / 3)
    assert report["summary"]["lora"]["pres"] == dict(mean=pytest.approx(0.2), low=None, high=None, n=1)
    assert report["paired"]["lora - prior"]["pres"]["low"] is None
    assert report["timing"]["prior"] == dict(runs=6, mean_wall_s=10.5) and len(report["runs"]) == 14
    table = (out / "toy_bench.md").read_text()
    assert "t-interval with the subject as the unit" in table
    assert f"| prior | 3 x 2 | 0.500 [0.500, 0.500] |" in table and "| lora | 1 x 2 |" in table
    assert "0.200 (n<2)" in table and "(n<2)" in table.split("lora - prior")[1].splitlines()[0]
    assert (out / "toy_bench.png").stat().st_size > 0


def test_bench_refuses_unknown_names_and_an_empty_report_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "train", lambda *a, **k: pytest.fail("trained"))
    assert toy_cli.main(["bench", "--subjects", "nobody", "--output_dir", str(tmp_path)]) == 2
    assert "unknown subject ['nobody']" in capsys.readouterr().err
    assert toy_cli.main(["bench", "--recipes", "prior", "dreams", "--output_dir", str(tmp_path)]) == 2
    assert toy_cli.main(["bench", "--report_only", "--output_dir", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_a_flow_model_bench_uses_its_recipe_and_guidance_and_keeps_to_its_own_folder(tmp_path, fakes, monkeypatch):
    from dreambooth_lib.config import TOY_FLOW_MODEL_DIR, TOY_MODEL_DIR

    train, guidance = FakeTrain(), []
    fakes(train)
    render_fake = bench.render_pictures
    monkeypatch.setattr(bench, "render_pictures", lambda pipe, subject, phrase, g: guidance.append(g) or render_fake(pipe, subject, phrase, g))
    base_fake = bench.base_class_pictures
    monkeypatch.setattr(bench, "base_class_pictures", lambda model, subjects, g: guidance.append((model, g)) or base_fake(model, subjects, g))
    flow = tmp_path / "flow"
    bench.run_bench(flow, subjects=[A], seeds=[0], oracle=FakeOracle(), log=lambda *a: None, model=TOY_FLOW_MODEL_DIR)
    # every recipe but lora (swept on the toy SD model only), each from the flow model with its demo recipe
    assert [Path(c.output_dir).parts[-3] for c in train.calls] == ["prior", "no_prior", "wrong_class_noun", "no_class_noun",
                                                                   "multi_subject"]
    assert {c.pretrained_model for c in train.calls} == {TOY_FLOW_MODEL_DIR}
    prior = train.calls[0]
    assert (prior.learning_rate, prior.train_text_encoder, prior.class_guidance_scale) == (
        demo.FLOW_RECIPE["learning_rate"], demo.FLOW_RECIPE["train_text_encoder"], demo.FLOW_RECIPE["class_guidance_scale"])
    assert guidance == [(TOY_FLOW_MODEL_DIR, demo.FLOW_GUIDANCE)] + [demo.FLOW_GUIDANCE] * 6  # 4 single runs + a pair's 2
    record = json.loads(bench.record_path(flow, "prior", A, 0).read_text())
    assert record["model"] == TOY_FLOW_MODEL_DIR and record["config"]["class_guidance_scale"] == 1.0
    assert f"Base model: `{TOY_FLOW_MODEL_DIR}`" in (flow / "report" / "toy_bench.md").read_text()

    # refused before any work: the SD model's runs into the flow folder (its finished runs would be skipped by
    # name), an older bench folder (no bench.json: the SD model's), the lora recipe on the flow model
    monkeypatch.setattr(bench, "train", lambda *a, **k: pytest.fail("trained"))
    quiet = dict(subjects=[A], seeds=[1], oracle=FakeOracle(), log=lambda *a: None)
    with pytest.raises(InputError, match="holds a bench of .*toy_flow_model.*another --output_dir"):
        bench.run_bench(flow, recipes=["prior"], model=TOY_MODEL_DIR, **quiet)
    (tmp_path / "older" / "runs").mkdir(parents=True)
    with pytest.raises(InputError, match="holds a bench of .*toy_model, not"):
        bench.run_bench(tmp_path / "older", recipes=["prior"], model=TOY_FLOW_MODEL_DIR, **quiet)
    with pytest.raises(InputError, match="--recipes lora: .*leave it out"):
        bench.run_bench(tmp_path / "flow_lora", recipes=["prior", "lora"], model=TOY_FLOW_MODEL_DIR, **quiet)
