"""Command line: python -m dreambooth_lib {train, class-images, sample, export-lora, evaluate} --help

    python -m dreambooth_lib train --instance_dir photos/ --class_noun dog --use_lora --output_dir runs/dog
    python -m dreambooth_lib sample runs/dog --prompt "a photo of {identifier} {class_noun} on the beach"
    python -m dreambooth_lib evaluate runs/dog
    python -m dreambooth_lib export-lora runs/dog

Every TrainConfig field is a flag (generated from the dataclass, help = the field's comment);
`--config run.json` supplies a base, and flags given on the command line override it. A run folder
(train's output_dir) is the handle of everything after training: its summary.json names the base
model, family, VAE, identifier and class noun. Flags are snake_case in every sub-command (and in
`python -m dreambooth_lib.toyworld`); the same flag with dashes (--class-noun) is accepted too.
Each command writes a JSON summary next to its outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import re
import shlex
import sys
import time
import typing
from pathlib import Path

from .config import TrainConfig
from .errors import InputError


def _flag_key(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


class Parser(argparse.ArgumentParser):
    """argparse with one flag style: snake_case, as TrainConfig's fields; the same flag with dashes
    (--class-noun, --no-center-crop) is accepted as an alias. Sub-command parsers are of this class too
    (add_subparsers makes them of the parent's class), so each rewrites the flags it knows."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        known = {_flag_key(o): o for o in self._option_string_actions if o.startswith("--")}
        canonical = []
        for i, arg in enumerate(args):
            if arg == "--":  # what follows is not flags
                canonical += args[i:]
                break
            name, eq, value = arg.partition("=")
            if arg.startswith("--") and name not in self._option_string_actions and _flag_key(name) in known:
                arg = known[_flag_key(name)] + eq + value
            canonical.append(arg)
        return super().parse_known_args(canonical, namespace)


class BoolFlag(argparse.BooleanOptionalAction):
    """--x / --no_x (argparse's own spells the negative --no-x, which Parser still accepts)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.option_strings = [o.replace("--no-", "--no_", 1) for o in self.option_strings]

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no_"))


def _field_comments() -> dict[str, str]:
    """`name: type = default  # comment` lines of TrainConfig -> {name: comment}."""
    pattern = re.compile(r"^\s+(\w+):[^#]*#\s*(.*)$")
    return {m[1]: m[2] for line in inspect.getsource(TrainConfig).splitlines() if (m := pattern.match(line))}


def _optional(parse):
    """'none' -> None, else parse(text): lets a flag reset an Optional field to its None meaning."""
    def convert(text: str):
        return None if text.lower() == "none" else parse(text)
    convert.__name__ = parse.__name__
    return convert


BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _union(types: tuple):
    """Parser of a `bool | str` or `int | str` field ("auto" or a value): the first type the text parses as."""
    def convert(text: str):
        for kind in types:
            if kind is bool and text.lower() in BOOL_WORDS:
                return BOOL_WORDS[text.lower()]
            if kind in (int, float):
                try:
                    return kind(text)
                except ValueError:
                    continue
            if kind is str:
                return text
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {[t.__name__ for t in types]}")
    convert.__name__ = "|".join(t.__name__ for t in types)
    return convert


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults stay SUPPRESSed so only given flags override --config."""
    parser.add_argument("--config", type=Path, help="JSON file of TrainConfig fields (flags override it)")
    hints, comments = typing.get_type_hints(TrainConfig), _field_comments()
    for f in dataclasses.fields(TrainConfig):
        hint, default = hints[f.name], (f.default_factory() if callable(f.default_factory) else f.default)
        kw = dict(default=argparse.SUPPRESS, help=f"{comments.get(f.name, '')} (default: {default!r})")
        args = typing.get_args(hint)
        if f.name == "subjects":  # a list of dicts: read from a JSON file (config_from_args)
            parser.add_argument("--subjects", type=Path, metavar="SUBJECTS.JSON", **kw)
        elif hint is bool:
            parser.add_argument(f"--{f.name}", action=BoolFlag, **kw)
        elif typing.get_origin(hint) is list:
            parser.add_argument(f"--{f.name}", nargs="*", type=args[0], metavar=args[0].__name__.upper(), **kw)
        elif args and type(None) not in args:  # bool | str, int | str: "auto" or a value
            parser.add_argument(f"--{f.name}", type=_union(args), metavar="|".join(a.__name__.upper() for a in args), **kw)
        elif type(None) in args:  # Optional[X]
            inner = next(a for a in args if a is not type(None))
            parser.add_argument(f"--{f.name}", type=_optional(inner), metavar=f"{inner.__name__.upper()}|none", **kw)
        else:
            parser.add_argument(f"--{f.name}", type=hint, metavar=hint.__name__.upper(), **kw)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = json.loads(args.config.read_text()) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in names})
    if isinstance(values.get("subjects"), Path):
        values["subjects"] = read_subjects(values["subjects"])
    return TrainConfig.from_dict(values)


def read_subjects(path: Path) -> list:
    """--subjects FILE: a JSON list of {"instance_dir", "class_noun", "identifier", "name"} (subjects.py checks it)."""
    if not path.is_file():
        raise InputError(f"--subjects {path} does not exist: write a JSON list of subjects, e.g. "
                         '[{"instance_dir": "photos/dog", "class_noun": "dog"}, {"instance_dir": "photos/cat", "class_noun": "cat"}]')
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"--subjects {path} is not valid JSON ({err}): write a list of subject dicts") from err


def peak_memory() -> dict:
    from .memory import peak_memory as measure  # imported late: keeps `--help` fast
    return measure()


def cmd_train(args) -> int:
    from .distributed import process_state
    from .train import train
    quiet_loading()
    summary = train(config_from_args(args))
    if process_state().is_main_process:  # several processes (accelerate launch): one summary, one block
        print("\n".join(closing_lines(summary)))
    return 0


def closing_lines(summary: dict) -> list[str]:
    """The last lines of a train run: where everything is, and the next command."""
    cfg = summary["config"]
    out = Path(cfg["output_dir"])
    parts = [f"weights {summary['weights']}"]
    if summary.get("num_class_images"):
        parts.append(f"class images {cfg['class_dir'] or out / 'class_images'}")
    parts += [f"{what} {out / name}" for what, name in (("validation grids", "validation"), ("checkpoints", "checkpoint-*"))
              if list(out.glob(name))]
    noun = cfg["class_noun"] or "subject"
    head = [f"summary: {out / 'summary.json'}", "run folder: " + "; ".join(parts)]
    sample = f"next: python -m dreambooth_lib sample {shlex.quote(str(out))} --prompt \"a photo of {{identifier}} {{class_noun}} on the beach\""
    if summary.get("subjects"):  # several subjects: --subject picks whose identifier fills the prompt
        listed = "; ".join(f"{r['name']}: {r['identifier']} {r['class_noun']}" for r in summary["subjects"])
        return head + [f"{sample} --subject {shlex.quote(summary['subjects'][0]['name'])}   (subjects {listed}; "
                       "also: evaluate RUN, export-lora RUN)"]
    return head + [f"{sample}   ({{identifier}} = {summary['identifier']}, {{class_noun}} = {noun}; "
                   "also: evaluate RUN, export-lora RUN)"]


def quiet_loading() -> None:
    """No "Loading pipeline components" / "Loading weights" bars for reading local models (hub downloads keep theirs)."""
    import diffusers
    import huggingface_hub
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # also turns off the hub's bars: turned back on below
    huggingface_hub.utils.enable_progress_bars()


def cmd_class_images(args) -> int:
    from . import distributed, families
    from .class_images import class_image_paths
    from .subjects import default_class_dir, subjects_of
    from .validate import validate_class_image_config
    quiet_loading()
    cfg = families.with_family_defaults(config_from_args(args))
    # one class noun, or (--subjects) each distinct class noun of the subjects in its own folder, as train makes them
    classes = {s.cfg.class_noun: s.cfg for s in subjects_of(cfg)} if cfg.subjects is not None else {cfg.class_noun: cfg}
    prompts = {noun: validate_class_image_config(c) for noun, c in classes.items()}  # no subject photos needed, unlike train
    families.check(cfg)
    main = distributed.process_state().is_main_process
    info = print if main else (lambda *a, **k: None)
    state = distributed.check_launch(info)  # several processes share the images out (each has its own seed)
    for noun, class_cfg in classes.items():
        started = time.time()
        paths = class_image_paths(class_cfg, prompts[noun], log=info,
                                  default_dir=default_class_dir(cfg, noun) if cfg.subjects is not None else None)
        folder = paths[0].parent
        if main:
            summary = dict(config=class_cfg.to_dict(), class_prompt=prompts[noun], class_dir=str(folder),
                           num_images=len(paths), wall_time_s=time.time() - started, device=_device(),
                           num_processes=state.num_processes, **peak_memory())
            (folder / "class_images_summary.json").write_text(json.dumps(summary, indent=2))
            print(f"{len(paths)} class images in {folder}")
    return 0


def cmd_sample(args) -> int:
    from .data import fill_prompt
    from .sample import generate, load_pipeline, pick_subject, read_run, run_sources, save_grid, set_lora_scales
    started = time.time()
    quiet_loading()
    run = read_run(args.run, check_sources=args.model is None) if args.run else None  # a bad folder fails here
    if run is not None:  # a several-subject run: --subject picks whose identifier and class noun fill the prompts
        placeholders = any("{identifier}" in p or "{class_noun}" in p for p in args.prompt)
        run = pick_subject(run, args.subject, needed=placeholders and not (args.identifier and args.class_noun))
    identifier = args.identifier or (run.identifier if run else None)
    class_noun = args.class_noun or (run.class_noun if run else None)
    given = "a run folder" if run is None else f"run {run.folder}"
    prompts = [fill_prompt(p, identifier, class_noun, f"--prompt (with {given}, or --identifier / --class_noun)")
               for p in args.prompt]
    sources = run_sources(run, args.model, args.lora_dir, args.vae_model)
    pipe = load_pipeline(**sources)
    if sources["lora_dir"] is not None or pipe.get_list_adapters():
        set_lora_scales(pipe, args.unet_scale, args.text_encoder_scale, text_encoder_2=args.text_encoder_2_scale)
    rows = [p for p in prompts for _ in args.seeds]
    images = generate(pipe, rows, list(args.seeds) * len(prompts), guidance_scale=args.guidance_scale,
                      num_inference_steps=args.num_inference_steps,
                      resolution=args.resolution or (run.resolution if run else None))
    save_grid(images, rows=len(prompts), cols=len(args.seeds), path=args.out)
    summary = dict({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   prompts=prompts, **{k: str(v) if v is not None else None for k, v in sources.items()},
                   num_images=len(images), wall_time_s=time.time() - started, device=str(pipe.device), **peak_memory())
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(f"grid: {args.out} ({len(prompts)} prompt(s) x {len(args.seeds)} seeds: {'; '.join(prompts)})")
    return 0


def cmd_export_lora(args) -> int:
    from .export import export_lora
    out = export_lora(args.run, args.out, args.format)
    print(f"{args.format} LoRA: {out}")
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    evaluate = importlib.import_module(f"{__package__}.evaluate")  # its own flags (evaluate --help); heavy imports
    quiet_loading()
    return evaluate.main(argv) or 0


def _device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m dreambooth_lib", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune; writes weights, checkpoints and summary.json to --output_dir")
    add_config_flags(train)
    classes = commands.add_parser("class-images", help="only generate/reuse the prior-preservation class images (needs "
                                  "--class_noun and the model; train reuses them from the same class_dir / output_dir)")
    add_config_flags(classes)
    sample = commands.add_parser("sample", help="images from a trained run (or any model) as a grid PNG (+ .json)")
    sample.add_argument("run", nargs="?", help="train's output_dir (or a checkpoint-N folder in it): base model, "
                        "LoRA, VAE, identifier and class noun come from it; the flags below override them")
    sample.add_argument("--model", default=None, help="pipeline folder or hub id (without RUN: required; with a LoRA "
                        "RUN: another base model for its LoRA)")
    sample.add_argument("--lora_dir", type=Path, help="folder with pytorch_lora_weights.safetensors (default: a LoRA RUN)")
    sample.add_argument("--prompt", nargs="+", required=True,
                        help="one grid row per prompt; {identifier} and {class_noun} are filled in from RUN")
    sample.add_argument("--subject", default=None, help="a several-subject RUN's subject (its name) whose identifier "
                        "and class noun fill the prompts")
    sample.add_argument("--identifier", default=None, help="fills {identifier} (default: RUN's)")
    sample.add_argument("--class_noun", default=None, help="fills {class_noun} (default: RUN's)")
    sample.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3], help="one grid column per seed")
    sample.add_argument("--guidance_scale", type=float, default=7.5)
    sample.add_argument("--num_inference_steps", type=int, default=25)
    sample.add_argument("--resolution", type=int, default=None, help="side in pixels (default: the run's training "
                        "resolution; without a run, the pipeline's default size: 1024 px for FLUX)")
    sample.add_argument("--unet_scale", type=float, default=1.0, help="LoRA scale of the UNet")
    sample.add_argument("--text_encoder_scale", type=float, default=1.0, help="LoRA scale of the text encoder(s)")
    sample.add_argument("--text_encoder_2_scale", type=float, default=None,
                        help="LoRA scale of SDXL's second text encoder (default: --text_encoder_scale)")
    sample.add_argument("--vae_model", default=None, help="a separate VAE (folder or hub id) to decode with (default: RUN's)")
    sample.add_argument("--out", type=Path, default=Path("samples/grid.png"), help="grid PNG path")
    export = commands.add_parser("export-lora", help="a LoRA run's weights in another tool's format (kohya: A1111, ComfyUI)")
    export.add_argument("run", type=Path, help="LoRA run folder or checkpoint-N (or its .safetensors file)")
    export.add_argument("--format", choices=["kohya"], default="kohya", help="kohya: lora_unet_* / lora_te1_* keys with alphas")
    export.add_argument("--out", type=Path, help="file to write (default: <run>/<its name>_kohya.safetensors)")
    commands.add_parser("evaluate", help="metrics of a trained run (see: evaluate --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    evaluate = argv[:1] == ["evaluate"]  # the evaluate module owns its own flags
    args = None if evaluate else build_parser().parse_args(argv)
    from .errors import InputError, SaveFailed, TrainingDiverged
    try:
        if evaluate:
            return cmd_evaluate(argv[1:])
        return {"train": cmd_train, "class-images": cmd_class_images, "sample": cmd_sample,
                "export-lora": cmd_export_lora}[args.command](args)
    except (InputError, TrainingDiverged, SaveFailed) as err:  # the message says what to do; no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1


if __name__ == "__main__":
    sys.exit(main())
