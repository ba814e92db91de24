"""The toy DreamBench: every subject x seed x recipe trained, rendered and scored by the oracle, then
per recipe the mean and 95 % t-interval of each metric (subjects as the unit) and the paired
differences between recipes on the same (subject, seed) (stats.py says why that interval).

    python -m dreambooth_lib.toyworld bench                      # 8 subjects x seeds 0 1 2 x 6 recipes
    python -m dreambooth_lib.toyworld bench --subjects marked_star banded_star --seeds 0 --max_train_steps 20
    python -m dreambooth_lib.toyworld bench --report_only        # table + figure again from the runs' JSON
    python -m dreambooth_lib.toyworld bench --model data/toy_flow_model --recipes prior no_prior --output_dir runs/toy_bench_flow

Under --output_dir (default runs/toy_bench):
    bench.json                             the base model the runs train from: a folder holds one model's runs
    class_images/seed<k>/<class>/          class images of one class and seed, shared by its subjects and recipes
    runs/<recipe>/<subject>/seed<k>.json   one finished run, written atomically once scored: a rerun skips it
    runs/<recipe>/<subject>/seed<k>/       its training folder (weights deleted after scoring unless keep_weights)
    runs/multi_subject/<a>+<b>/seed<k>/    a two-subject run; its records are runs/multi_subject/<a>/seed<k>.json and <b>'s
A training folder without its JSON is an interrupted run: it is deleted and trained again from scratch; one
with its JSON keeps only its summary.json (unless keep_weights), as when the run was scored.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dreambooth_lib.config import TOY_MODEL_DIR, is_toy_model
from dreambooth_lib.errors import InputError
from dreambooth_lib.fsio import write_text_durably
from dreambooth_lib.sample import load_pipeline
from dreambooth_lib.subjects import class_folder_name
from dreambooth_lib.toyworld import demo, render, stats
from dreambooth_lib.toyworld import oracle as oracle_lib
from dreambooth_lib.train import train

RECIPES = {
    "prior": "full fine-tune with prior preservation (the demo's recipe, the paper's method)",
    "no_prior": "the same without the prior loss (paper Table 3)",
    "wrong_class_noun": "another class's noun in the instance prompt ('a photo of gtc ball' for a star), "
                        "without the prior, like no_prior (paper Table 4)",
    "no_class_noun": "no class noun in the instance prompt ('a photo of gtc'), without the prior (paper Table 4)",
    "lora": "LoRA rank 32 (UNet attention + text encoder), 1,600 steps of 1 + 1 pictures, with the prior",
    "multi_subject": "two subjects in one model (a look-alike pair where there is one), prior on, class images "
                     "per class, 2 x the demo's steps so each subject gets its single run's share of the loss",
}
# The comparisons of the report: the paper's, all against the method; the class-noun recipes also
# against no_prior, which differs from them only by the noun (both without the prior).
COMPARISONS = [("prior", r) for r in ("no_prior", "wrong_class_noun", "no_class_noun", "lora", "multi_subject")] + [
    ("no_prior", "wrong_class_noun"), ("no_prior", "no_class_noun")]
METRICS = ["recontext_subject_fidelity", "recontext_context_followed", "subject_fidelity", "prompt_fidelity",
           "pres", "div", "class_div", "class_context_shift", "cross_talk"]
KEY_METRICS = ["pres", "subject_fidelity", "recontext_subject_fidelity", "prompt_fidelity", "div",
               "class_context_shift", "cross_talk"]
CONFIG_FIELDS = ("use_lora", "lora_rank", "learning_rate", "text_encoder_lr", "train_batch_size", "max_train_steps",
                 "with_prior_preservation", "num_class_images", "class_dir", "instance_prompt_template", "class_noun",
                 "subjects", "optimizer", "class_guidance_scale", "train_text_encoder", "seed")
INTERVAL = ("95 % Student t-interval with the subject as the unit: each subject's value is its mean over seeds, "
            "the interval mean +- t(0.975, n-1) sd / sqrt(n) over the n subjects (stats.py)")


def wrong_class_noun(subject: str) -> str:
    """The next class after the subject's in render.CLASSES (star -> ball, fish -> star): a fixed wrong noun."""
    classes = render.CLASSES
    return classes[(classes.index(render.SUBJECTS[subject]["cls"]) + 1) % len(classes)]


def multi_subject_pairs() -> list[tuple[str, str]]:
    """Every subject once: the look-alike pairs (same class and colour, where cross-talk matters) first,
    then the others two by two in SUBJECTS order."""
    pairs, used = [], set()
    for a, b in render.lookalike_pairs():
        if not {a, b} & used:
            pairs.append((a, b))
            used |= {a, b}
    rest = [s for s in render.SUBJECTS if s not in used]
    if len(rest) % 2:
        raise ValueError(f"an odd number of subjects outside the look-alike pairs ({rest}): pair them by hand")
    return pairs + list(zip(rest[::2], rest[1::2]))


def partner(subject: str) -> str:
    return next(b if a == subject else a for a, b in multi_subject_pairs() if subject in (a, b))


def record_path(root: Path, recipe: str, subject: str, seed: int) -> Path:
    return root / "runs" / recipe / subject / f"seed{seed}.json"


def run_config(root: Path, recipe: str, subject: str, seed: int, max_train_steps: int | None = None,
               model: str = TOY_MODEL_DIR):
    """demo_config (for `model`) with the recipe's changes and the seed; class images in the shared (class, seed) folder."""
    changes = dict(demo.ABLATIONS[recipe][0])
    if recipe == "wrong_class_noun":
        changes["class_noun"] = wrong_class_noun(subject)
    if max_train_steps:
        changes["max_train_steps"] = max_train_steps
    cfg = demo.demo_config(subject, str(record_path(root, recipe, subject, seed).with_suffix("")), model, seed=seed, **changes)
    if cfg.with_prior_preservation:
        cfg = dataclasses.replace(cfg, class_dir=str(root / "class_images" / f"seed{seed}" / class_folder_name(cfg.class_noun)))
    return cfg


def pair_config(root: Path, pair: tuple[str, str], seed: int, max_train_steps: int | None = None,
                model: str = TOY_MODEL_DIR):
    """The two subjects in one run with distinct picked identifiers; steps = len(pair) x a single run's.
    The loss is a mean over the batch's rows and each subject fills 1 / len(pair) of them, so each gets
    the gradient weight of its single run (its 1,600 instance rows); at the demo's 400 steps each would
    get half. class_dir is the seed's folder: subjects.py puts each class in <class_dir>/<class>."""
    single = demo.demo_config(pair[0], str(root / "runs" / "multi_subject" / "+".join(pair) / f"seed{seed}"), model, seed=seed)
    entries = [dict(name=s, instance_dir=str(demo.SUBJECTS_DIR / s), class_noun=render.SUBJECTS[s]["cls"], identifier=None)
               for s in pair]
    return dataclasses.replace(single, instance_dir="", class_noun="", identifier=None, subjects=entries,
                               class_dir=str(root / "class_images" / f"seed{seed}"),
                               max_train_steps=len(pair) * (max_train_steps or single.max_train_steps))


def render_pictures(pipe, subject: str, phrase: str, guidance_scale: float):
    """The subject's prompt suites (named by `phrase`) and the plain class prompt, from a tuned pipeline."""
    return (demo.sample_suites(pipe, subject, phrase, guidance_scale=guidance_scale),
            demo.class_prompt_images(pipe, subject, guidance_scale=guidance_scale)[1])


def base_class_pictures(model: str, subjects, guidance_scale: float) -> dict[str, list]:
    """The base model's class-prompt pictures (PRES seeds) of each class of `subjects`, rendered once per class."""
    pipe, out = load_pipeline(model), {}
    for subject in subjects:
        cls = render.SUBJECTS[subject]["cls"]
        if cls not in out:
            out[cls] = demo.class_prompt_images(pipe, subject, guidance_scale=guidance_scale)[1]
    return out


def score_subject(oracle, suites: dict, class_images, subject: str, base_images, other: str) -> dict:
    """demo.score's metrics plus recontextualization's two and cross-talk: the share of the subject's prompt
    pictures the oracle calls `other` (its multi-subject partner; in a single-subject run the baseline)."""
    table = demo.score(oracle, suites, class_images, subject, base_class_images=base_images)
    overall = table.pop("overall")
    contexts = overall.pop("class_contexts")
    called = [p["subject"] for p in oracle.predict([im for rows in suites.values() for r in rows for im in r["images"]])]
    recontext = table["recontextualization"]
    metrics = dict(overall, recontext_subject_fidelity=recontext["subject_fidelity"],
                   recontext_context_followed=recontext["prompt_fidelity"], cross_talk=called.count(other) / len(called))
    return dict(metrics=metrics, per_category=table, class_contexts=contexts)


def make_record(recipe: str, subject: str, seed: int, summary: dict, identifier: str, instance_prompt: str,
                class_noun: str, scored: dict, started: float) -> dict:
    cfg = summary["config"]
    return dict(recipe=recipe, what=RECIPES[recipe], model=cfg.get("pretrained_model"), subject=subject, seed=seed,
                true_class=render.SUBJECTS[subject]["cls"],
                class_noun=class_noun, identifier=identifier, instance_prompt=instance_prompt, partner=partner(subject),
                **scored, config={k: cfg.get(k) for k in CONFIG_FIELDS},
                train=dict(steps=summary["steps"], final_loss=summary["final_loss"], wall_time_s=summary["wall_time_s"],
                           seconds_per_step=summary["seconds_per_step"], optimizer=summary.get("optimizer")),
                wall_time_s=time.time() - started)


def write_record(root: Path, record: dict) -> None:
    path = record_path(root, record["recipe"], record["subject"], record["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)  # a pair's subjects have no training folder of their own there
    write_text_durably(path, json.dumps(record, indent=1))


def fresh_folder(folder: Path) -> None:
    if folder.exists():  # an interrupted run: its half-trained state is not resumed
        shutil.rmtree(folder)


def drop_weights(folder: Path) -> None:
    """Everything of a scored run but its summary.json (31 MB of pipeline per full fine-tune)."""
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.name != "summary.json":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_single(root, recipe, subject, seed, oracle, base, max_train_steps, keep_weights, log, model=TOY_MODEL_DIR) -> None:
    started = time.time()
    cfg = run_config(root, recipe, subject, seed, max_train_steps, model)
    fresh_folder(Path(cfg.output_dir))
    summary = train(cfg, log=log, progress=False)
    noun = cfg.class_noun if "{class_noun}" in cfg.instance_prompt_template else ""  # as trained; class prompt: true class
    suites, class_images = render_pictures(demo.load_tuned(cfg), subject, f"{summary['identifier']} {noun}".strip(),
                                           demo.guidance_for(model))
    scored = score_subject(oracle, suites, class_images, subject, base[render.SUBJECTS[subject]["cls"]], partner(subject))
    record = make_record(recipe, subject, seed, summary, summary["identifier"], summary["instance_prompt"], noun, scored, started)
    write_record(root, record)
    if not keep_weights:
        drop_weights(Path(cfg.output_dir))


def run_pair(root, pair, seed, oracle, base, max_train_steps, keep_weights, log, model=TOY_MODEL_DIR) -> None:
    started = time.time()
    cfg = pair_config(root, pair, seed, max_train_steps, model)
    fresh_folder(Path(cfg.output_dir))
    summary = train(cfg, log=log, progress=False)
    pipe = demo.load_tuned(cfg)
    records = []
    for subject, entry in zip(pair, summary["subjects"]):
        suites, class_images = render_pictures(pipe, subject, f"{entry['identifier']} {entry['class_noun']}",
                                               demo.guidance_for(model))
        scored = score_subject(oracle, suites, class_images, subject, base[entry["class_noun"]], partner(subject))
        records.append(make_record("multi_subject", subject, seed, summary, entry["identifier"], entry["instance_prompt"],
                                   entry["class_noun"], dict(scored, pair=list(pair)), started))
    for record in records:  # the pair's wall time (one training, both subjects rendered) in both
        record["wall_time_s"] = time.time() - started
        write_record(root, record)
    if not keep_weights:
        drop_weights(Path(cfg.output_dir))


def drop_leftover_weights(root: Path) -> None:
    """The weights of finished runs: a run killed between writing its JSON and dropping them left them behind."""
    for folder in root.glob("runs/*/*/seed*"):
        if folder.is_dir() and folder.name[4:].isdigit():
            recipe, members, seed = folder.parts[-3], folder.parts[-2].split("+"), int(folder.name[4:])
            if all(record_path(root, recipe, s, seed).is_file() for s in members):
                drop_weights(folder)


def check_model(root: Path, model: str) -> None:
    """One base model per bench folder: finished runs are skipped by name, so another model's would be taken
    for this one's. bench.json records the model; a folder of runs without it is the toy SD model's (older benches)."""
    manifest = root / "bench.json"
    if manifest.is_file():
        made_with = json.loads(manifest.read_text())["model"]
    elif (root / "runs").is_dir():
        made_with = TOY_MODEL_DIR
    else:
        made_with = model
    if Path(made_with).resolve() != Path(model).resolve():
        raise InputError(f"{root} holds a bench of {made_with}, not {model}: give another --output_dir")
    if not manifest.is_file():
        root.mkdir(parents=True, exist_ok=True)
        write_text_durably(manifest, json.dumps(dict(model=made_with), indent=1))


def check_selection(subjects, seeds, recipes) -> None:
    for kind, given, known in (("subject", subjects, list(render.SUBJECTS)), ("recipe", recipes, list(RECIPES))):
        unknown = [x for x in given if x not in known]
        if unknown:
            raise InputError(f"--{kind}s: unknown {kind} {unknown}; choose from {known}")
    missing = [s for s in subjects if not (demo.SUBJECTS_DIR / s).is_dir()]
    if missing:
        raise InputError(f"no photos for {missing} in {demo.SUBJECTS_DIR}: write them with render.write_subject_images")
    if not seeds or any(s < 0 for s in seeds):
        raise InputError(f"--seeds {seeds}: give one or more non-negative integers")


def run_bench(output_dir="runs/toy_bench", subjects=None, seeds=(0, 1, 2), recipes=None, max_train_steps=None,
              keep_weights=False, images_dir=None, oracle=None, log=print, model: str = TOY_MODEL_DIR) -> dict:
    """Train and score every missing (recipe, subject, seed) run, seed by seed, then write the report.
    multi_subject trains each pair holding a selected subject (both records written). `model`: the toy base
    model the runs start from (demo_config's recipe for it; the flow model's pictures at its guidance)."""
    if recipes is None:  # the lora recipe's rank, rates and steps were swept on the toy SD model only
        recipes = [r for r in RECIPES if r != "lora" or is_toy_model(model)]
    subjects, recipes = list(dict.fromkeys(subjects or render.SUBJECTS)), list(dict.fromkeys(recipes))
    seeds = list(dict.fromkeys(int(s) for s in seeds))  # a name given twice runs once
    check_selection(subjects, seeds, recipes)
    if "lora" in recipes and not is_toy_model(model):
        raise InputError(f"--recipes lora: its rank, rates and steps were swept on {TOY_MODEL_DIR} only, not on {model}; "
                         "leave it out")
    root = Path(output_dir)
    check_model(root, model)
    pairs = [p for p in multi_subject_pairs() if set(p) & set(subjects)]
    todo = [(seed, recipe, members) for seed in seeds for recipe in RECIPES if recipe in recipes  # seed by seed
            for members in (pairs if recipe == "multi_subject" else [(s,) for s in subjects])
            if not all(record_path(root, recipe, s, seed).is_file() for s in members)]
    if not keep_weights:
        drop_leftover_weights(root)
    log(f"bench: {len(todo)} runs to do in {root} (finished runs skipped)")
    if todo:
        oracle = oracle or oracle_lib.load_oracle()
        base = base_class_pictures(model, sorted({s for *_, ss in todo for s in ss}), demo.guidance_for(model))
    for k, (seed, recipe, members) in enumerate(todo):
        log(f"bench run {k + 1}/{len(todo)}: {recipe} {'+'.join(members)} seed {seed}")
        if recipe == "multi_subject":
            run_pair(root, members, seed, oracle, base, max_train_steps, keep_weights, log, model)
        else:
            run_single(root, recipe, members[0], seed, oracle, base, max_train_steps, keep_weights, log, model)
    return write_report(root, Path(images_dir) if images_dir else root / "report", log)


# ---------------------------------------------------------------------------------------------
# report


def load_records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "runs").glob("*/*/seed*.json"))]


def _subject_count(runs, recipe) -> int:
    return len({r["subject"] for r in runs if r["recipe"] == recipe})


def _mean_over_subjects(values: dict[tuple[str, int], float]) -> float:
    by_subject = {}
    for (subject, _), v in values.items():
        by_subject.setdefault(subject, []).append(v)
    return float(np.mean([np.mean(v) for v in by_subject.values()]))


def recipe_row(runs, recipe, metric) -> dict:
    """mean, low, high, n (subjects): stats' t-interval, or the mean alone (low = high = None) with n < 2."""
    if _subject_count(runs, recipe) >= 2:
        return stats.recipe_interval(runs, recipe, metric).as_dict()
    values = {(r["subject"], r["seed"]): r["metrics"][metric] for r in runs if r["recipe"] == recipe}
    return dict(mean=_mean_over_subjects(values), low=None, high=None, n=1)


def paired_row(runs, a, b, metric) -> dict | None:
    """b - a on the shared (subject, seed) runs: stats.paired_difference, the mean alone with n < 2, None if none."""
    keys = {(r["subject"], r["seed"]) for r in runs if r["recipe"] == a} & {(r["subject"], r["seed"]) for r in runs if r["recipe"] == b}
    if not keys:
        return None
    if len({s for s, _ in keys}) >= 2:
        return stats.paired_difference(runs, a, b, metric).as_dict()
    value = {(r["recipe"], r["subject"], r["seed"]): r["metrics"][metric] for r in runs}
    return dict(mean=_mean_over_subjects({k: value[(b, *k)] - value[(a, *k)] for k in keys}), low=None, high=None, n=1)


def cell(row: dict | None, signed: bool = False) -> str:
    if row is None:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if row["low"] is None:
        return fmt.format(row["mean"]) + " (n<2)"
    return f"{fmt.format(row['mean'])} [{fmt.format(row['low'])}, {fmt.format(row['high'])}]"


def cross_talk_rows(runs) -> list[dict]:
    """Per pair and direction: the share of A's prompt pictures called B, trained together vs A's prior run."""
    out = []
    for pair in multi_subject_pairs():
        for a, b in (pair, pair[::-1]):
            row = dict(subject=a, called=b)
            for recipe in ("multi_subject", "prior"):
                values = [r["metrics"]["cross_talk"] for r in runs if r["recipe"] == recipe and r["subject"] == a]
                row[recipe] = dict(mean=float(np.mean(values)), seeds=len(values)) if values else None
            if row["multi_subject"] is not None:
                out.append(row)
    return out


def write_report(root: Path, images_dir: Path, log=print) -> dict:
    """toy_bench.md (tables), toy_bench_runs.json (every run's record + the tables' numbers), toy_bench.png."""
    runs = load_records(root)
    if not runs:
        raise InputError(f"no finished runs under {root / 'runs'}: run the bench first (without --report_only)")
    recipes = [r for r in RECIPES if any(x["recipe"] == r for x in runs)]
    summary = {r: {m: recipe_row(runs, r, m) for m in METRICS} for r in recipes}
    paired = {f"{b} - {a}": {m: paired_row(runs, a, b, m) for m in KEY_METRICS}
              for a, b in COMPARISONS if a in recipes and b in recipes}
    talk = cross_talk_rows(runs)
    timing = {}
    for r in recipes:  # one training run each: a pair's two records share theirs
        walls = {(tuple(x.get("pair") or [x["subject"]]), x["seed"]): x["wall_time_s"] for x in runs if x["recipe"] == r}
        timing[r] = dict(runs=len(walls), mean_wall_s=float(np.mean(list(walls.values()))))

    def shape(recipe):
        mine = [x for x in runs if x["recipe"] == recipe]
        return f"{_subject_count(runs, recipe)} x {len({x['seed'] for x in mine})}"

    manifest = root / "bench.json"
    model = json.loads(manifest.read_text())["model"] if manifest.is_file() else TOY_MODEL_DIR
    lines = ["# Toy DreamBench", "", f"Base model: `{model}`.", "",
             f"Each cell: mean [95 % interval]. Interval: {INTERVAL}; n<2: runs of one subject, "
             "no interval. Metrics: oracle shares (docs/toy_world.md); PRES, class context shift and cross-talk: "
             "lower is better.", "", "## Per recipe", "",
             "| recipe | subjects x seeds | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    lines += [f"| {r} | {shape(r)} | " + " | ".join(cell(summary[r][m]) for m in METRICS) + " |" for r in recipes]
    lines += ["", "## Paired differences (b - a, same subject and seed; t-interval over subjects)", "",
              "| b - a | subjects | " + " | ".join(KEY_METRICS) + " |", "|---" * (len(KEY_METRICS) + 2) + "|"]
    lines += [f"| {name} | {rows[KEY_METRICS[0]]['n']} | " + " | ".join(cell(rows[m], signed=True) for m in KEY_METRICS) + " |"
              for name, rows in paired.items() if rows[KEY_METRICS[0]] is not None]
    if talk:
        lines += ["", "## Cross-talk: share of A's prompt pictures the oracle calls B", "",
                  "| A | B | A and B in one model | A alone (prior) |", "|---|---|---|---|"]
        lines += [f"| {t['subject']} | {t['called']} | " + " | ".join(
            "-" if t[r] is None else f"{t[r]['mean']:.3f} (seeds: {t[r]['seeds']})" for r in ("multi_subject", "prior")) + " |"
            for t in talk]
    lines += ["", "## Setup", "", "| recipe | what | training runs | mean wall time per run (s) |", "|---|---|---|---|"]
    lines += [f"| {r} | {RECIPES[r]} | {timing[r]['runs']} | {timing[r]['mean_wall_s']:.0f} |" for r in recipes]
    lines += ["", "Wrong class nouns: " + ", ".join(f"{s} ({render.SUBJECTS[s]['cls']}) -> {wrong_class_noun(s)}"
                                                   for s in render.SUBJECTS) + ".",
              "Multi-subject pairs: " + ", ".join(" + ".join(p) for p in multi_subject_pairs()) + "."]
    images_dir.mkdir(parents=True, exist_ok=True)
    (images_dir / "toy_bench.md").write_text("\n".join(lines) + "\n")
    result = dict(model=model, interval=INTERVAL, summary=summary, paired=paired, cross_talk=talk, timing=timing, runs=runs)
    (images_dir / "toy_bench_runs.json").write_text(json.dumps(result, indent=1))
    plot_bench(summary, images_dir / "toy_bench.png", model)
    log("\n".join(lines))
    log(f"bench report written to {images_dir}/toy_bench.{{md,png}} and toy_bench_runs.json ({len(runs)} runs)")
    return result


def plot_bench(summary: dict, path: Path, model: str = TOY_MODEL_DIR) -> None:
    """Grouped bars: per metric, one bar per recipe at its mean with its 95 % t-interval (none for n<2)."""
    metrics = [m for m in METRICS if m != "class_div"]
    x, width = np.arange(len(metrics)), 0.8 / len(summary)
    fig = Figure(figsize=(12, 4.4))
    ax = fig.subplots()
    for i, (recipe, rows) in enumerate(summary.items()):
        means = np.array([rows[m]["mean"] for m in metrics])
        lows = np.array([rows[m]["low"] if rows[m]["low"] is not None else rows[m]["mean"] for m in metrics])
        highs = np.array([rows[m]["high"] if rows[m]["high"] is not None else rows[m]["mean"] for m in metrics])
        ax.bar(x + i * width, means, width, yerr=[means - lows, highs - means], capsize=2, label=recipe)
    ax.set_xticks(x + width * (len(summary) - 1) / 2, [m.replace("_", " ").replace("recontext ", "recontext.\n")
                                                       for m in metrics], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=len(summary), loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below: bars stay visible
    ax.set_title(f"toy DreamBench on {Path(model).name}: mean and 95 % t-interval over subjects "
                 "(PRES, context shift, cross-talk: lower is better)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
