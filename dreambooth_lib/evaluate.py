"""DreamBench-style evaluation of one fine-tuned subject (Ruiz et al., CVPR 2023, Sec. 4.1).

The paper renders 25 prompts per subject, 4 images each: objects get 20 recontextualization and
5 property-modification prompts; live subjects (pets) 10 recontextualization, 10 accessorization
and 5 property modification. The prompt lists below follow that structure with our own wording.
Each category gets DINO, CLIP-I, CLIP-T and DIV; the overall row adds PRES, computed on the
fine-tuned model's plain "a [class noun]" images. Results are written as JSON + CSV next to the
paper's Table 1 rows, with one example grid per category. Under `accelerate launch --num_processes N`
the prompts are dealt to the processes and their images gathered: the table equals one process's.

    python -m dreambooth_lib evaluate runs/dog --live          # model, photos, class noun, identifier from the run
    python -m dreambooth_lib evaluate runs/pets                # a several-subject run: each subject in turn (--subject NAME: one)
    python -m dreambooth_lib evaluate --model runs/dog --instance_dir data/dog --class_noun dog --identifier sks --live
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import distributed
from .data import fill_prompt, load_instance_images
from .errors import InputError
from .metrics import (
    CLIP_ID,
    DINO_ID,
    Encoders,
    clip_i_score,
    clip_t_score,
    default_device,
    dino_score,
    div_per_prompt,
    load_clip,
    load_dino,
    pres_score,
    strip_identifier,
)
from .sample import generate, load_pipeline, pick_subject, read_run, run_sources, save_grid

_RECONTEXT = [
    "a {identifier} {class_noun} on a wooden pier at sunset",
    "a {identifier} {class_noun} in a snowy pine forest",
    "a {identifier} {class_noun} in a field of lavender",
    "a {identifier} {class_noun} on a rainy city sidewalk at night",
    "a {identifier} {class_noun} on a picnic blanket in a park",
    "a {identifier} {class_noun} on a desert sand dune",
    "a {identifier} {class_noun} on the deck of a sailboat",
    "a {identifier} {class_noun} with snowy mountains in the background",
    "a {identifier} {class_noun} on a stone bridge over a river",
    "a {identifier} {class_noun} in front of a red brick wall",
]
OBJECT_PROMPTS = {
    "recontextualization": _RECONTEXT
    + [
        "a {identifier} {class_noun} on a kitchen counter next to fresh bread",
        "a {identifier} {class_noun} on the surface of the moon",
        "a {identifier} {class_noun} on a library shelf between old books",
        "a {identifier} {class_noun} on a mossy rock beside a waterfall",
        "a {identifier} {class_noun} on a marble table in a museum",
        "a {identifier} {class_noun} in a glass display case",
        "a {identifier} {class_noun} on a tiled bathroom floor",
        "a {identifier} {class_noun} in a sunflower field under a clear sky",
        "a {identifier} {class_noun} with a lighthouse in the background",
        "a {identifier} {class_noun} on a windowsill with potted plants",
    ],
    "property": [
        "a green {identifier} {class_noun}",
        "a {identifier} {class_noun} made of clear glass",
        "a golden {identifier} {class_noun}",
        "a {identifier} {class_noun} carved out of wood",
        "a {identifier} {class_noun} covered in frost",
    ],
}
LIVE_PROMPTS = {
    "recontextualization": _RECONTEXT,
    "accessorization": [
        "a {identifier} {class_noun} wearing a knitted green beanie",
        "a {identifier} {class_noun} wearing round sunglasses",
        "a {identifier} {class_noun} wearing a red bow tie",
        "a {identifier} {class_noun} wearing a yellow raincoat",
        "a {identifier} {class_noun} wearing a pirate hat",
        "a {identifier} {class_noun} wearing an astronaut suit",
        "a {identifier} {class_noun} wearing a flower crown",
        "a {identifier} {class_noun} in a striped sailor shirt",
        "a {identifier} {class_noun} wearing a cowboy hat and a bandana",
        "a {identifier} {class_noun} in a superhero cape",
    ],
    "property": OBJECT_PROMPTS["property"],
}
CLASS_PROMPT = "a {class_noun}"  # PRES: the fine-tuned model asked for any member of the class
CLASS_CATEGORY = "class_prompt"
GRID_THUMB = 256  # grid cell size in pixels (20 prompts x 4 full-size images would be a huge PNG)

COLUMNS = ["DINO", "CLIP-I", "CLIP-T", "PRES"]  # + the DIV column named by metrics.div_per_prompt
# Paper, Table 1 (subject fidelity DINO / CLIP-I, prompt fidelity CLIP-T; None = not reported).
PAPER_ROWS = {
    "Real images": {"DINO": 0.774, "CLIP-I": 0.885, "CLIP-T": None},
    "DreamBooth (Stable Diffusion)": {"DINO": 0.668, "CLIP-I": 0.803, "CLIP-T": 0.305},
    "DreamBooth (Imagen)": {"DINO": 0.696, "CLIP-I": 0.812, "CLIP-T": 0.306},
    "Textual Inversion (Stable Diffusion)": {"DINO": 0.569, "CLIP-I": 0.780, "CLIP-T": 0.255},
}
NEEDS_REAL = (
    "{metrics} need a real pretrained {enc} encoder ({default} or a local save_pretrained folder, "
    "--{flag} ID_OR_PATH); {reason}"
)


def prompt_set(live: bool, prompt_limit: int | None = None) -> dict[str, list[str]]:
    """Prompt templates by category; `prompt_limit` keeps the first N of each (smoke runs)."""
    prompts = LIVE_PROMPTS if live else OBJECT_PROMPTS
    return {cat: list(templates[:prompt_limit]) for cat, templates in prompts.items()}


def check_inputs(class_noun: str, identifier: str, n_per_prompt: int, seeds: Sequence[int]) -> None:
    if not class_noun.strip() or not identifier.strip():
        raise InputError("class_noun and identifier must be set (e.g. 'dog' and 'sks', as in training)")
    if n_per_prompt < 2 or len(seeds) != n_per_prompt:
        raise InputError(
            f"need n_per_prompt >= 2 (diversity is pairwise) and one seed per image; got {n_per_prompt} and seeds {list(seeds)}"
        )


def _weighted(values: list[float | None], weights: list[int]) -> float | None:
    """Overall = mean over all images (or prompts) = category means weighted by their counts."""
    if any(v is None for v in values):
        return None
    return float(np.average(values, weights=weights))


def _merge_extra(rows: dict, columns: list[str], extra: object) -> None:
    if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
        raise TypeError(
            "extra_metrics must return {row: {column: value}} with rows such as 'overall' or a prompt category, "
            f"got {type(extra).__name__}"
        )
    for row, values in extra.items():
        rows.setdefault(row, {})
        for col, value in values.items():
            rows[row][col] = value
            if col not in columns:
                columns.append(col)


def evaluate_run(
    pipe,
    subject_images: Sequence[Image.Image],
    class_noun: str,
    identifier: str,
    live: bool,
    encoders: Encoders,
    n_per_prompt: int = 4,
    seeds: Sequence[int] | None = None,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    prompt_limit: int | None = None,
    extra_metrics: Callable[[dict[str, list[Image.Image]]], dict] | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    grid_prompts: int = 5,
    resolution: int | None = None,
) -> dict:
    """Generate the protocol's images with `pipe` and score them against the real `subject_images`.

    resolution: the side rendered (the run's training size; None: the pipeline's default, 1024 px for FLUX).
    `extra_metrics(images_by_category)` (categories plus "class_prompt") returns
    {row: {column: value}}, merged into the table. With `out_dir`: results.json, results.csv,
    grid_<category>.png and every image under images/<category>/.
    Returns {"columns", "rows", "paper", "prompts", "missing", "settings", "files"}.
    Several processes (accelerate launch): each renders its share of the prompts (every prompt's seeds in
    one batch, as one process would), all get every image and the same table; the main one writes files.
    """
    seeds = list(range(n_per_prompt)) if seeds is None else [int(s) for s in seeds]
    check_inputs(class_noun, identifier, n_per_prompt, seeds)
    if not subject_images:
        raise InputError("no real subject images given: DINO / CLIP-I compare against them")
    if extra_metrics is not None and not callable(extra_metrics):
        raise TypeError("extra_metrics must be a callable(images_by_category) -> {row: {column: value}}")

    templates = prompt_set(live, prompt_limit)
    jobs = [(cat, fill_prompt(t, identifier, class_noun)) for cat, ts in templates.items() for t in ts]
    jobs.append((CLASS_CATEGORY, fill_prompt(CLASS_PROMPT, class_noun=class_noun)))
    is_main = distributed.process_state().is_main_process
    mine = distributed.my_share(jobs)
    done = [(i, generate(pipe, prompt, seeds, guidance_scale, num_inference_steps, batch_size=len(seeds), progress=False,
                         resolution=resolution))
            for i, (cat, prompt) in tqdm(mine, desc="evaluate: generating", unit="prompt", disable=not is_main)]
    groups: dict[str, list[tuple[str, list[Image.Image]]]] = {}
    for (cat, prompt), images in zip(jobs, distributed.gather_results(done, len(jobs))):
        groups.setdefault(cat, []).append((prompt, images))
    images_by_cat = {cat: [im for _, ims in g for im in ims] for cat, g in groups.items()}

    dino, clip = encoders.dino, encoders.clip
    missing = []
    if dino is None:
        missing.append(NEEDS_REAL.format(metrics="DINO and PRES", enc="DINO", default=DINO_ID, flag="dino", reason="none loaded"))
    if clip is None:
        missing.append(NEEDS_REAL.format(metrics="CLIP-I and CLIP-T", enc="CLIP", default=CLIP_ID, flag="clip", reason="none loaded"))
    div_name = "DIV"
    if encoders.lpips is None and dino is None:
        missing.append("DIV needs an LPIPS model or, as a fallback, a DINO encoder; none loaded")

    rows: dict[str, dict] = {}
    prompts_out: dict[str, list[dict]] = {}
    for cat in templates:
        group, gen = groups[cat], images_by_cat[cat]
        prompts = [p for p, ims in group for _ in ims]  # one per image, for CLIP-T
        rows[cat] = {
            "n_prompts": len(group),
            "n_images": len(gen),
            "DINO": dino_score(gen, subject_images, dino, batch_size) if dino else None,
            "CLIP-I": clip_i_score(gen, subject_images, clip, batch_size) if clip else None,
            "CLIP-T": clip_t_score(gen, prompts, clip, identifier, batch_size)[0] if clip else None,
            "PRES": None,  # a property of the model, not of a prompt category: overall row only
        }
        if encoders.lpips is not None or dino is not None:
            values, div_name = div_per_prompt([ims for _, ims in group], encoders.lpips, dino, batch_size)
            rows[cat][div_name] = float(np.mean(values))
        prompts_out[cat] = [{"prompt": p, "clip_t_prompt": strip_identifier(p, identifier)} for p, _ in group]

    cats = list(templates)
    img_w = [rows[c]["n_images"] for c in cats]
    overall = {"n_prompts": sum(rows[c]["n_prompts"] for c in cats), "n_images": sum(img_w)}
    for col in ("DINO", "CLIP-I", "CLIP-T"):
        overall[col] = _weighted([rows[c][col] for c in cats], img_w)
    overall["PRES"] = pres_score(images_by_cat[CLASS_CATEGORY], subject_images, dino, batch_size) if dino else None
    overall[div_name] = _weighted([rows[c].get(div_name) for c in cats], [rows[c]["n_prompts"] for c in cats])
    rows["overall"] = overall
    prompts_out[CLASS_CATEGORY] = [{"prompt": p, "clip_t_prompt": None} for p, _ in groups[CLASS_CATEGORY]]

    columns = COLUMNS + [div_name]
    if extra_metrics is not None:
        _merge_extra(rows, columns, extra_metrics(images_by_cat))

    result = {
        "columns": columns,
        "rows": rows,
        "paper": PAPER_ROWS,
        "prompts": prompts_out,
        "missing": missing,
        "settings": dict(
            class_noun=class_noun, identifier=identifier, live=live, n_real_images=len(subject_images),
            n_per_prompt=n_per_prompt, seeds=seeds, guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps, prompt_limit=prompt_limit, resolution=resolution,
            dino=dino.name if dino else None, clip=clip.name if clip else None,
        ),
        "files": {},
    }
    if out_dir is not None and is_main:
        result["files"] = save_results(result, groups, Path(out_dir), seeds, grid_prompts)
    return result


def save_results(result: dict, groups: dict, out_dir: Path, seeds: list[int], grid_prompts: int) -> dict:
    """results.json, results.csv (ours and the paper's rows), a grid per category, all images."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "results.json"), "csv": str(out_dir / "results.csv"), "grids": {}}
    for cat, prompt_images in groups.items():
        for p, (_, ims) in enumerate(prompt_images):
            (out_dir / "images" / cat).mkdir(parents=True, exist_ok=True)
            for seed, im in zip(seeds, ims):
                im.save(out_dir / "images" / cat / f"{p:02d}_seed{seed}.png")
        shown = prompt_images[:grid_prompts]
        thumbs = [im.resize((GRID_THUMB, GRID_THUMB), Image.Resampling.BICUBIC) for _, ims in shown for im in ims]
        labels = [f"{prompt} (seed {seed})" if k == 0 else f"seed {seed}" for prompt, _ in shown for k, seed in enumerate(seeds)]
        grid_path = out_dir / f"grid_{cat}.png"
        save_grid(thumbs, len(shown), len(seeds), grid_path, labels)
        files["grids"][cat] = str(grid_path)
    result = {**result, "files": files}
    Path(files["json"]).write_text(json.dumps(result, indent=2))
    with open(files["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        columns = result["columns"]
        writer.writerow(["source", "row", "n_prompts", "n_images", *columns])
        for name, row in result["rows"].items():
            writer.writerow(["ours", name, row.get("n_prompts", ""), row.get("n_images", ""), *[_cell(row.get(c)) for c in columns]])
        for name, row in result["paper"].items():
            writer.writerow(["paper", name, "", "", *[_cell(row.get(c)) for c in columns]])
    return files


def _cell(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(result: dict) -> str:
    """Our rows, then the paper's Table 1 rows, as aligned text ('-' = not computed / reported)."""
    columns = result["columns"]
    names = [*result["rows"], *(f"paper: {n}" for n in result["paper"])]
    first = max(len(n) for n in names) + 2
    widths = [max(len(c), 6) + 2 for c in columns]
    lines = ["".ljust(first) + "".join(c.rjust(w) for c, w in zip(columns, widths))]
    rows = [*result["rows"].values(), *result["paper"].values()]
    for name, row in zip(names, rows):
        cells = [("-" if row.get(c) is None else _cell(row.get(c))).rjust(w) for c, w in zip(columns, widths)]
        lines.append(name.ljust(first) + "".join(cells))
    return "\n".join(lines + [f"note: {m}" for m in result["missing"]])


def load_encoders_for_cli(dino: str | None, clip: str | None, device) -> tuple[Encoders, list[str]]:
    """Explicit --dino/--clip must load (bad input otherwise); the default hub ids may be
    unavailable offline (toy world), which leaves those metrics empty with a plain note."""
    encoders, notes = Encoders(), []
    for flag, given, default, loader, what in (
        ("dino", dino, DINO_ID, load_dino, "DINO and PRES"),
        ("clip", clip, CLIP_ID, load_clip, "CLIP-I and CLIP-T"),
    ):
        try:
            setattr(encoders, flag, loader(given or default, device=device))
        except FileNotFoundError as err:
            if given:
                raise InputError(f"--{flag} {given}: {err}") from err
            enc = flag.upper()
            notes.append(NEEDS_REAL.format(metrics=what, enc=enc, default=default, flag=flag, reason=f"skipped: {err}"))
    return encoders, notes


def build_parser():
    from .__main__ import Parser  # snake_case flags, dashed spellings accepted (as every sub-command)

    ap = Parser(prog="python -m dreambooth_lib evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", help="train's output_dir (or a checkpoint-N folder in it): model, LoRA, VAE, "
                    "subject photos, class noun and identifier come from it; the flags below override them")
    ap.add_argument("--model", default=None, help="diffusers pipeline folder or hub id (fine-tuned, or base with "
                    "--lora_dir); without RUN: required")
    ap.add_argument("--lora_dir", "--lora", default=None, help="folder with LoRA weights to load into --model")
    ap.add_argument("--vae_model", default=None, help="a separate VAE to decode with (default: RUN's)")
    ap.add_argument("--instance_dir", "--subject_dir", default=None, help="folder with the real subject photos (default: RUN's)")
    ap.add_argument("--subject", default=None, help="a several-subject RUN's subject (its name); default: each in turn, "
                    "results in <out>/<name>")
    ap.add_argument("--class_noun", default=None, help="default: RUN's")
    ap.add_argument("--identifier", default=None, help="default: RUN's")
    ap.add_argument("--live", action="store_true", help="live subject (pet): adds accessorization prompts")
    ap.add_argument("--dino", default=None, help=f"DINO hub id or local folder (default {DINO_ID})")
    ap.add_argument("--clip", default=None, help=f"CLIP hub id or local folder (default {CLIP_ID})")
    ap.add_argument("--n_per_prompt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="image k of every prompt uses seed + k")
    ap.add_argument("--guidance_scale", type=float, default=7.5)
    ap.add_argument("--num_inference_steps", type=int, default=50)
    ap.add_argument("--resolution", type=int, default=None, help="side in pixels (default: the run's training "
                    "resolution; without a run, the pipeline's default size)")
    ap.add_argument("--prompt_limit", type=int, default=None, help="first N prompts per category")
    ap.add_argument("--batch_size", type=int, default=32, help="encoder batch size")
    ap.add_argument("--out", default=None, help="results folder (default: <RUN>/evaluation, else runs/evaluate)")
    ap.add_argument("--smoke", action="store_true", help="1 prompt per category, 2 images, 2 steps: plumbing check")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.prompt_limit, args.n_per_prompt, args.num_inference_steps = 1, 2, 2

    # Cheap checks first: the run, subject photos, model folder, encoders; then the pipeline.
    run = read_run(args.run, check_sources=args.model is None) if args.run else None
    out = args.out or (str(Path(run.folder) / "evaluation") if run else "runs/evaluate")
    # A several-subject run: each subject (or --subject's) in turn, with its photos, identifier, class noun.
    subjects = [r["name"] for r in run.subjects] if run and run.subjects and args.subject is None else [args.subject]
    targets, seeds = [], list(range(args.seed, args.seed + args.n_per_prompt))
    for name in subjects:
        one = pick_subject(run, name, needed=False) if run else None
        subject_dir = args.instance_dir or (one.instance_dir if one else None)
        class_noun = args.class_noun or (one.class_noun if one else "")
        identifier = args.identifier or (one.identifier if one else None) or ""
        if not subject_dir:
            raise InputError("no subject photos: pass a run folder (train's output_dir) or --instance_dir")
        check_inputs(class_noun, identifier, args.n_per_prompt, seeds)
        real = [im.image for im in load_instance_images(subject_dir, resolution=0)]
        targets.append((name, real, class_noun, identifier, out if len(subjects) == 1 else str(Path(out) / name)))
    for flag, value in (("--model", args.model), ("--lora_dir", args.lora_dir)):
        if value and value.startswith(("/", ".", "~")) and not Path(value).expanduser().exists():
            raise InputError(f"{flag} {value} does not exist: pass the training output folder or a hub id")
    sources = run_sources(run, args.model, args.lora_dir, args.vae_model)
    state = distributed.process_state()
    is_main = state.is_main_process
    distributed.check_launch(lambda line: print(f"[evaluate] {line}", file=sys.stderr) if is_main else None)
    device = state.device if state.num_processes > 1 else default_device()  # several: each process its own GPU
    encoders, notes = load_encoders_for_cli(args.dino, args.clip, device)
    for note in notes if is_main else []:
        print(f"[evaluate] {note}", file=sys.stderr)
    pipe = load_pipeline(**sources, device=device)
    for name, real, class_noun, identifier, subject_out in targets:
        result = evaluate_run(
            pipe, real, class_noun, identifier, args.live, encoders,
            n_per_prompt=args.n_per_prompt, seeds=seeds,
            guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
            prompt_limit=args.prompt_limit, out_dir=subject_out, batch_size=args.batch_size,
            resolution=args.resolution or (run.resolution if run else None),
        )
        if is_main:
            if len(targets) > 1:
                print(f"subject {name} ({identifier} {class_noun}):")
            print(format_table(result))
            print(f"[evaluate] wrote {result['files']['json']}, {result['files']['csv']} and grids in {subject_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
