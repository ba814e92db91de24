"""Command line: python -m dreambooth_lib {train, class-images, sample, export-lora, evaluate} --help

Every TrainConfig field is a flag (generated from the dataclass, help = the field's comment);
`--config run.json` supplies a base, and flags given on the command line override it.
Each command writes a JSON summary next to its outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import re
import sys
import time
import typing
from pathlib import Path

from .config import TrainConfig


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
        if hint is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
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
    return TrainConfig.from_dict(values)


def peak_memory() -> dict:
    from .memory import peak_memory as measure  # imported late: keeps `--help` fast
    return measure()


def cmd_train(args) -> int:
    from .distributed import process_state
    from .train import train
    summary = train(config_from_args(args))
    if process_state().is_main_process:  # several processes (accelerate launch): one summary, one line
        print(f"summary: {Path(summary['config']['output_dir']) / 'summary.json'}")
    return 0


def cmd_class_images(args) -> int:
    from . import distributed, families
    from .class_images import class_image_paths
    from .validate import validate_class_image_config
    cfg = families.with_native_resolution(config_from_args(args))
    class_prompt = validate_class_image_config(cfg)  # no subject photos needed, unlike train
    families.check(cfg)
    started = time.time()
    main = distributed.process_state().is_main_process
    info = print if main else (lambda *a, **k: None)
    state = distributed.check_launch(info)  # several processes share the images out (each has its own seed)
    paths = class_image_paths(cfg, class_prompt, log=info)
    folder = paths[0].parent
    if main:
        summary = dict(config=cfg.to_dict(), class_prompt=class_prompt, class_dir=str(folder), num_images=len(paths),
                       wall_time_s=time.time() - started, device=_device(), num_processes=state.num_processes,
                       **peak_memory())
        (folder / "class_images_summary.json").write_text(json.dumps(summary, indent=2))
        print(f"{len(paths)} class images in {folder}")
    return 0


def cmd_sample(args) -> int:
    from .sample import generate, load_pipeline, save_grid, set_lora_scales
    started = time.time()
    pipe = load_pipeline(args.model, lora_dir=args.lora_dir, vae_model=args.vae_model)
    if args.lora_dir is not None or pipe.get_list_adapters():
        set_lora_scales(pipe, args.unet_scale, args.text_encoder_scale, text_encoder_2=args.text_encoder_2_scale)
    prompts = [p for p in args.prompt for _ in args.seeds]
    images = generate(pipe, prompts, list(args.seeds) * len(args.prompt), guidance_scale=args.guidance_scale,
                      num_inference_steps=args.num_inference_steps)
    save_grid(images, rows=len(args.prompt), cols=len(args.seeds), path=args.out)
    summary = dict(vars(args) | {"out": str(args.out), "model": str(args.model),
                                 "lora_dir": str(args.lora_dir) if args.lora_dir else None},
                   num_images=len(images), wall_time_s=time.time() - started, device=str(pipe.device), **peak_memory())
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(f"grid: {args.out}")
    return 0


def cmd_export_lora(args) -> int:
    from .export import export_lora
    out = export_lora(args.lora_dir, args.out, args.format)
    print(f"{args.format} LoRA: {out}")
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    evaluate = importlib.import_module(f"{__package__}.evaluate")  # imported late: heavy imports
    return evaluate.main(argv) or 0


def _device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_lib", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune; writes weights, checkpoints and summary.json to --output_dir")
    add_config_flags(train)
    classes = commands.add_parser("class-images", help="only generate/reuse the prior-preservation class images (needs "
                                  "--class_noun and the model; train reuses them from the same class_dir / output_dir)")
    add_config_flags(classes)
    sample = commands.add_parser("sample", help="images from a trained model as a grid PNG (+ .json)")
    sample.add_argument("--model", required=True, help="pipeline folder, hub id, or a checkpoint-N folder")
    sample.add_argument("--lora_dir", type=Path, help="folder with pytorch_lora_weights.safetensors")
    sample.add_argument("--prompt", nargs="+", required=True, help="one grid row per prompt")
    sample.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3], help="one grid column per seed")
    sample.add_argument("--guidance_scale", type=float, default=7.5)
    sample.add_argument("--num_inference_steps", type=int, default=25)
    sample.add_argument("--unet_scale", type=float, default=1.0, help="LoRA scale of the UNet")
    sample.add_argument("--text_encoder_scale", type=float, default=1.0, help="LoRA scale of the text encoder(s)")
    sample.add_argument("--text_encoder_2_scale", type=float, default=None,
                        help="LoRA scale of SDXL's second text encoder (default: --text_encoder_scale)")
    sample.add_argument("--vae_model", default=None, help="a separate VAE (folder or hub id) to decode with")
    sample.add_argument("--out", type=Path, default=Path("samples/grid.png"), help="grid PNG path")
    export = commands.add_parser("export-lora", help="a LoRA run's weights in another tool's format (kohya: A1111, ComfyUI)")
    export.add_argument("lora_dir", type=Path, help="LoRA run folder or checkpoint-N (or its .safetensors file)")
    export.add_argument("--format", choices=["kohya"], default="kohya", help="kohya: lora_unet_* / lora_te1_* keys with alphas")
    export.add_argument("--out", type=Path, help="file to write (default: <lora_dir>/<its name>_kohya.safetensors)")
    commands.add_parser("evaluate", help="metrics of a trained model (see: evaluate --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["evaluate"]:  # the evaluate module owns its own flags
        return cmd_evaluate(argv[1:])
    args = build_parser().parse_args(argv)
    from .errors import InputError, SaveFailed, TrainingDiverged
    try:
        return {"train": cmd_train, "class-images": cmd_class_images, "sample": cmd_sample,
                "export-lora": cmd_export_lora}[args.command](args)
    except (InputError, TrainingDiverged, SaveFailed) as err:  # the message says what to do; no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1


if __name__ == "__main__":
    sys.exit(main())
