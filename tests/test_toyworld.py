"""The toy world: renderer determinism, tokenizer, the oracle and its metrics, the committed base model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from dreambooth_lib.config import TOY_MODEL_DIR, TrainConfig, resolve_auto
from dreambooth_lib.toyworld import oracle as orc
from dreambooth_lib.toyworld import render
from dreambooth_lib.toyworld.tokenizer import all_captions, build_tokenizer, rare_tokens

SUBJECTS_DIR = Path(__file__).resolve().parents[1] / "data" / "subjects"


@pytest.fixture(scope="module")
def oracle():
    return orc.load_oracle(orc.ORACLE_DIR)  # committed; a missing one is a failure, not a skip


def _renders(n: int, seed: int, **kw) -> list[Image.Image]:
    pixels, _ = render.render_dataset(n, seed, **kw)
    return [Image.fromarray(p) for p in pixels]


def test_render_is_deterministic_in_spec_and_seed():
    spec = render.sample_spec(np.random.default_rng(0), context="grass")
    a, b, c = (np.asarray(render.render(spec, seed)) for seed in (7, 7, 8))
    assert a.shape == (render.SIZE, render.SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # the seed moves the grass blades
    x1, specs1 = render.render_dataset(4, seed=3)
    x2, specs2 = render.render_dataset(4, seed=3)
    assert np.array_equal(x1, x2) and specs1 == specs2


def test_pictures_without_subjects_render_as_when_the_toy_model_was_pretrained():
    """data/toy_model's pretraining set is rendered from seeds: adding subjects must not move a pixel of
    it. The hash was taken at commit 74e3b57 (two subjects), before the six later subjects were added;
    a Pillow that draws or resizes differently fails here too, and then pretraining is not reproducible."""
    import hashlib

    pixels, specs = render.render_dataset(200, seed=2)  # pretrain.py renders its set with render_dataset
    assert all(s.subject is None for s in specs)
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == "f934857b8f8ae4fdcd9a2bae32fa1b7541fe49cdb5a5e479f550fb28e316f128"


def test_committed_subject_photos_are_five_renders_per_subject(tmp_path):
    folders = render.write_subject_images(tmp_path)
    assert sorted(folders) == sorted(p.name for p in SUBJECTS_DIR.iterdir() if p.is_dir()) == sorted(render.SUBJECTS)
    assert len(render.SUBJECTS) >= 8 and set(v["cls"] for v in render.SUBJECTS.values()) == set(render.CLASSES)
    assert len(render.lookalike_pairs()) >= 2  # same class and colour, only the marking differs
    for name, folder in folders.items():
        fresh, committed = sorted(folder.glob("*.png")), sorted((SUBJECTS_DIR / name).glob("*.png"))
        assert [p.name for p in committed] == [f"{i:02d}.png" for i in range(5)], name
        for a, b in zip(fresh, committed, strict=True):
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), b


def test_tokenizer_round_trips_captions_and_rare_tokens_are_unused(tmp_path):
    tok = build_tokenizer(tmp_path)
    captions = all_captions()
    words = {w for c in captions for w in c.split()}
    for caption in captions:
        ids = tok(caption).input_ids
        assert len(ids) <= tok.model_max_length
        assert tok.decode(ids, skip_special_tokens=True) == caption
    rare = rare_tokens(words)
    assert len(rare) > 0
    for token in rare:
        assert token not in words
        assert len(tok.tokenize(token)) == 1, token


def test_committed_tokenizer_loads_from_vocab_and_merges_alone(tmp_path):
    import shutil

    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(Path(TOY_MODEL_DIR) / "tokenizer" / name, tmp_path)
    committed, classic = CLIPTokenizer.from_pretrained(Path(TOY_MODEL_DIR) / "tokenizer"), CLIPTokenizer.from_pretrained(tmp_path)
    texts = all_captions() + [f"a photo of {t} star" for t in rare_tokens({w for c in all_captions() for w in c.split()})]
    assert all(classic(t).input_ids == committed(t).input_ids for t in texts)
    assert classic.model_max_length == committed.model_max_length == 16


def test_oracle_knows_every_subject_on_fresh_renders(oracle):
    for name, fixed in render.SUBJECTS.items():
        photos = [Image.open(p).convert("RGB") for p in sorted((SUBJECTS_DIR / name).glob("*.png"))]
        assert orc.subject_fidelity(oracle, photos, name) == 1.0, name
        # fresh pictures (any context and size, a quarter of them sketches; seeded, so the same every run)
        assert orc.subject_fidelity(oracle, _renders(8, seed=20, subject=name), name) >= 7 / 8, name
        # same class, same colour, no marking: never the subject
        lookalikes = _renders(6, seed=5, cls=fixed["cls"], colour=fixed["colour"], style="photo")
        assert orc.subject_fidelity(oracle, lookalikes, name) == 0.0, name
    for a, b in render.lookalike_pairs():  # only the marking differs: never the other one
        assert orc.subject_fidelity(oracle, _renders(8, seed=21, subject=b, style="photo"), a) == 0.0, (a, b)
        assert orc.subject_fidelity(oracle, _renders(8, seed=21, subject=a, style="photo"), b) == 0.0, (a, b)


def test_base_subject_eval_counts_each_subject_on_its_own_prompts(oracle, monkeypatch):
    """Stubbed sampler: for every prompt, seed 0 draws the subject being checked, seed 1 the next
    subject, seeds 2-3 a plain picture; only seed 0 counts, so every share is 1/4."""
    from dreambooth_lib import sample

    names = list(render.SUBJECTS)
    own = {n: _renders(1, seed=30, subject=n, style="photo")[0] for n in names}
    plain = _renders(1, seed=31, cls="star", colour="red", style="photo")[0]
    calls = []

    def fake_generate(pipe, prompts, seeds, *a, **k):
        name = names[len(calls)]  # one call per subject, in SUBJECTS order
        calls.append(prompts)
        other = own[names[len(calls) % len(names)]]
        return [own[name] if s == 0 else other if s == 1 else plain for s in seeds]

    monkeypatch.setattr(sample, "generate", fake_generate)
    pipe = type("Pipe", (), {"tokenizer": CLIPTokenizer.from_pretrained(Path(TOY_MODEL_DIR) / "tokenizer")})()
    result = orc.base_subject_eval(oracle, pipe, n=4, log=lambda *_: None)
    assert result["identifier"] == "gtc" and list(result["per_subject"]) == names
    for name, row in result["per_subject"].items():
        assert row == dict(suite=0.25, class_prompt=0.25, worst_prompt_share=0.25,
                           worst_prompt=orc.prompt_suite(name)["recontextualization"][0][0].format(identifier="gtc"))
    assert calls[0][-1] == orc.class_prompt(names[0]) and len(calls[0]) == 4 * 19


def test_metrics_on_known_renderer_images(oracle):
    stars = _renders(6, seed=11, cls="star", context="snow", style="photo", colour="red")
    assert orc.prompt_fidelity(oracle, stars, {"class": "star", "context": "snow"}) == 1.0
    assert orc.prompt_fidelity(oracle, stars, {"class": "star", "colour": "red", "style": "photo"}) == 1.0
    assert orc.prompt_fidelity(oracle, stars, {"context": "grass"}) == 0.0
    sketches = _renders(4, seed=12, cls="ball", style="sketch")
    assert orc.prompt_fidelity(oracle, sketches, {"class": "ball", "style": "sketch"}) == 1.0
    assert orc.div(oracle, [stars[0]] * 4) == pytest.approx(0.0, abs=1e-5)
    assert 0.0 < orc.div(oracle, stars) < 1.0
    with pytest.raises(ValueError, match="pattern"):
        orc.prompt_fidelity(oracle, stars, {"pattern": "plain"})
    with pytest.raises(ValueError, match="at least 2"):
        orc.div(oracle, stars[:1])
    grass = _renders(4, seed=13, cls="star", context="grass", style="photo")
    shift = orc.attribute_shift(oracle, stars[:4], stars[:2] + grass[:2])  # snow x4 -> snow x2 + grass x2
    assert shift == dict(total_variation=0.5, before={"snow": 1.0}, after={"snow": 0.5, "grass": 0.5})
    assert orc.attribute_shift(oracle, stars, grass)["total_variation"] == 1.0
    assert orc.attribute_shift(oracle, stars, stars[::-1], head="colour")["total_variation"] == 0.0
    with pytest.raises(ValueError, match="head 'pose'"):
        orc.attribute_shift(oracle, stars, grass, head="pose")
    pred = oracle.predict(stars[:1])[0]
    assert pred["class"] == "star" and sum(pred["probs"]["class"].values()) == pytest.approx(1.0, abs=1e-5)
    assert oracle.features(stars).shape == (6, 8 * oracle.info["width"])


def test_prompt_suites_use_caption_words_and_evaluate_rendered_subjects(oracle):
    vocab = {w for c in all_captions() for w in c.split()}
    for name in render.SUBJECTS:
        suite = orc.prompt_suite(name)
        assert [len(suite[k]) for k in ("recontextualization", "property", "art")] == [6, 5, 7]
        for entries in suite.values():
            for template, expected in entries:
                assert template.count("{identifier}") == 1
                assert set(template.replace("{identifier}", "").split()) <= vocab, template
                assert expected["class"] == render.SUBJECTS[name]["cls"]
        assert set(orc.class_prompt(name).split()) <= vocab
    assert orc.PROMPT_SUITES["marked_star"] == orc.prompt_suite("marked_star")

    # Rendered subject pictures matching each recontextualization prompt: every score is hand-known.
    suite = orc.prompt_suite("marked_star")
    by_prompt = {}
    for template, expected in suite["recontextualization"]:
        specs = [render.sample_spec(np.random.default_rng(i), subject="marked_star", style="photo",
                                    context=expected["context"]) for i in range(3)]
        by_prompt[template.format(identifier="xqz")] = [render.render(s, seed=i) for i, s in enumerate(specs)]
    by_prompt[orc.class_prompt("marked_star")] = _renders(3, seed=4, cls="star", colour="red")
    result = orc.evaluate_images(oracle, by_prompt, "marked_star")
    recontext = result["per_category"]["recontextualization"]
    assert (recontext["n_prompts"], recontext["n_images"]) == (6, 18)
    assert recontext["subject_fidelity"] == 1.0 and recontext["prompt_fidelity"] == 1.0
    assert result["pres"] == 0.0
    with pytest.raises(ValueError, match="not in prompt_suite"):
        orc.evaluate_images(oracle, {"a photo of a fish": by_prompt[orc.class_prompt("marked_star")]}, "marked_star")


def test_oracle_rejects_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="oracle-train"):
        orc.load_oracle(tmp_path)


def test_committed_model_follows_a_class_prompt(oracle):
    assert (Path(TOY_MODEL_DIR) / "model_index.json").is_file(), "the toy model is committed under data/toy_model"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(8)]
    images = pipe(["a photo of a star"] * 8, generator=generators, guidance_scale=7.0, num_inference_steps=20).images
    assert images[0].size == (render.SIZE, render.SIZE)
    classes = [p["class"] for p in oracle.predict(images)]
    assert classes.count("star") >= 6, classes


def test_short_dreambooth_run_moves_subject_fidelity_up(oracle, tmp_path):
    """100 CPU steps of the demo's recipe teach the base model the subject it cannot draw (measured: fidelity
    0.0 -> 0.96 after 100 steps, 1.0 after 200; the assertion asks for +0.375)."""
    from dreambooth_lib.sample import generate, load_pipeline
    from dreambooth_lib.toyworld.demo import demo_config
    from dreambooth_lib.train import train

    cfg = demo_config("marked_star", str(tmp_path / "run"), with_prior_preservation=False, max_train_steps=100)
    summary = train(cfg, progress=False)
    # every recontextualization prompt, 4 seeds each: one context alone can fool the oracle (the base
    # model draws look-alike yellow stars on the beach for 3 of seeds 0-7)
    prompts = [t.format(identifier=summary["identifier"]) for t, _ in orc.prompt_suite("marked_star")["recontextualization"]]

    def fidelity(model):
        pipe = load_pipeline(model)
        images = [im for p in prompts for im in generate(pipe, p, [0, 1, 2, 3], 7.0, 20, batch_size=4, progress=False)]
        return orc.subject_fidelity(oracle, images, "marked_star")

    before, after = fidelity(TOY_MODEL_DIR), fidelity(cfg.output_dir)
    assert before <= 0.125 and after >= before + 0.375, (before, after)


def test_ablation_report_shows_recontextualization_and_reloads_from_its_json(tmp_path):
    from dreambooth_lib.toyworld.demo import write_ablation_report

    def run(sf, ctx, pres):
        overall = dict(subject_fidelity=0.3, prompt_fidelity=0.5, div=0.1, pres=pres, class_div=0.2, class_context_shift=0.4)
        return dict(what="", instance_prompt="", metrics=overall,
                    per_category={"recontextualization": dict(subject_fidelity=sf, prompt_fidelity=ctx, div=0.1)})

    results = {"prior": run(0.854, 0.958, 0.031), "no_prior": run(0.5, 0.25, 1.0)}
    write_ablation_report(results, tmp_path, log=lambda *_: None)
    rows = (tmp_path / "toy_ablations.md").read_text().splitlines()
    assert rows[0].startswith("| | recontext_subject_fidelity | recontext_context_followed |")
    assert rows[2] == "| prior | 0.854 | 0.958 | 0.300 | 0.500 | 0.031 | 0.100 | 0.200 | 0.400 |"
    assert rows[3].startswith("| no_prior | 0.500 | 0.250 |")
    assert (tmp_path / "toy_ablations.png").stat().st_size > 0
    first = (tmp_path / "toy_ablations.md").read_text()
    write_ablation_report(json.loads((tmp_path / "toy_ablations.json").read_text()), tmp_path, log=lambda *_: None)
    assert (tmp_path / "toy_ablations.md").read_text() == first


def test_recipe_gives_the_swept_toy_settings_on_the_toy_model_and_sd_ones_elsewhere(tmp_path):
    from dreambooth_lib.toyworld.demo import TOY_LORA, demo_config, recipe

    swept = {**TOY_LORA, "lora_rank": 32, "learning_rate": 1e-3, "text_encoder_lr": 1e-4}  # run cl_s1600
    assert recipe("lora", TOY_MODEL_DIR) == swept
    assert recipe("lora", str(Path(TOY_MODEL_DIR) / ".." / "toy_model")) == swept  # the same folder, spelt differently
    full = recipe("full", TOY_MODEL_DIR)
    demo = demo_config()
    assert (full["use_lora"], full["learning_rate"], full["train_batch_size"]) == (False, demo.learning_rate, demo.train_batch_size)
    # The demo's explicit rates are the ones TrainConfig's "auto" gives a full fine-tune of the toy model.
    auto = resolve_auto(TrainConfig(pretrained_model=TOY_MODEL_DIR))[0]
    assert (auto.learning_rate, auto.text_encoder_lr) == (demo.learning_rate, demo.text_encoder_lr) == (1e-4, 3e-5)
    sd = recipe("lora", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert (sd["lora_rank"], sd["learning_rate"]) == (4, 1e-4)
    assert recipe("full", str(tmp_path))["learning_rate"] == 5e-6
    with pytest.raises(ValueError, match="'lora' or 'full'"):
        recipe("dora", TOY_MODEL_DIR)


def test_pretraining_is_reproducible_from_its_seed(tmp_path):
    """All three stages (tokenizer, VAE, UNet + text encoder) on a tiny budget: the same seed writes
    byte-identical weights and tokenizer files, another seed other weights (and other rare tokens)."""
    from dreambooth_lib.toyworld.pretrain import pretrain

    def weights(name, seed):
        out = tmp_path / name / "model"
        pretrain(out=out, seed=seed, num_images=16, vae_steps=2, steps=2, batch_size=4, images_dir=tmp_path / name,
                 vae_images=16, log=lambda *_: None)
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                if p.suffix == ".safetensors" or p.parent.name == "tokenizer"}

    first, again, other = weights("a", 0), weights("b", 0), weights("c", 1)
    assert len(first) == 7 and first == again
    assert all(other[k] != first[k] for k in first if k.endswith(".safetensors") or k.endswith("vocab.json"))


def test_pretraining_continues_from_a_pipeline_keeping_its_tokenizer_and_vae(tmp_path):
    from diffusers import StableDiffusionPipeline

    from dreambooth_lib.toyworld.pretrain import pretrain

    out = tmp_path / "continued"
    result = pretrain(out=out, init=TOY_MODEL_DIR, num_images=16, steps=2, batch_size=4, images_dir=tmp_path,
                      log=lambda *_: None)
    assert (result["init"], result["steps_done"], result["final_vae_loss"]) == (TOY_MODEL_DIR, 2, None)
    before, after = (StableDiffusionPipeline.from_pretrained(p, safety_checker=None) for p in (TOY_MODEL_DIR, out))
    assert after.vae.config.scaling_factor == before.vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(after.vae.state_dict().values(), before.vae.state_dict().values()))
    assert after.tokenizer.get_vocab() == before.tokenizer.get_vocab()
    moved = [not torch.equal(a, b) for a, b in zip(after.unet.state_dict().values(), before.unet.state_dict().values())]
    assert any(moved)  # the UNet was trained further, starting from the committed weights:
    diff = max((a - b).abs().max().item() for a, b in zip(after.unet.parameters(), before.unet.parameters()))
    assert diff < 0.05, diff
    assert (tmp_path / "toy_pretrain_loss.png").is_file()
    # the continued model's log carries the whole history: the init's cycles, then this one
    init_log = json.loads((Path(TOY_MODEL_DIR) / "pretrain_log.json").read_text())
    init_cycles = init_log.pop("earlier_cycles", []) + [init_log]
    assert result["earlier_cycles"] == init_cycles
    assert len(result["unet_loss"]) == 1 and "earlier_cycles" not in result["earlier_cycles"][-1]


def test_demo_and_ablations_write_only_under_their_output_folder(tmp_path, monkeypatch):
    """The main job's file writes, with training and sampling stubbed: figures and metrics land under
    runs/ (relative to the working directory) by default, and the checkout's tracked files stay as they were."""
    import subprocess

    from dreambooth_lib.toyworld import __main__ as toy_cli
    from dreambooth_lib.toyworld import demo

    repo = Path(demo.REPO)

    def status():
        try:
            return subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True,
                                  check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    def fake_train(cfg, log=print, progress=True):
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        return dict(identifier="gtc", instance_prompt="a photo of gtc star", steps=1, final_loss=0.1, wall_time_s=0.0,
                    seconds_per_step=None, optimizer="torch.optim.AdamW", peak_memory_mb=1.0, device="cpu")

    pictures = _renders(8, seed=0)

    def fake_generate(pipe, prompt, seeds, *a, **k):
        return [pictures[s % 8] for s in seeds]

    monkeypatch.setattr(demo, "train", fake_train)
    monkeypatch.setattr(demo, "load_pipeline", lambda *a, **k: object())
    monkeypatch.setattr(demo, "generate", fake_generate)
    monkeypatch.chdir(tmp_path)
    before = status()
    assert toy_cli.main(["demo", "--steps", "1"]) == 0
    demo.run_ablations(names=("prior",), log=lambda *_: None)

    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert "runs/toy_demo/demo_metrics.json" in written and "runs/toy_demo/figures/toy_demo_marked_star_metrics.json" in written
    assert "runs/toy_demo/figures/toy_demo_marked_star_recontextualization.png" in written
    assert {"runs/toy_ablations/figures/toy_ablations.md", "runs/toy_ablations/figures/toy_ablations.png"} <= set(written)
    assert all(w.startswith(("runs/toy_demo/", "runs/toy_ablations/")) for w in written)
    assert status() == before  # nothing of the checkout changed (images/ included)
