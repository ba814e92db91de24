"""python -m dreambooth_lib.toyworld demo | ablate | bench | pretrain | pretrain-flow | oracle-train | oracle-eval | base-eval"""

from __future__ import annotations

import json
import sys


def build_parser():
    from dreambooth_lib.__main__ import Parser  # snake_case flags like every sub-command; dashed ones accepted

    parser = Parser(prog="python -m dreambooth_lib.toyworld", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain the toy base model (VAE, then UNet + text encoder)")
    p.add_argument("--out", default=None, help="pipeline folder to write (default data/toy_model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=7000, help="UNet optimizer steps")
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_images", type=int, default=40000, help="size of the rendered pretraining set")
    p.add_argument("--minutes", type=float, default=None, help="stop early after this wall time")
    p.add_argument("--learning_rate", "--lr", type=float, default=3e-4, help="peak learning rate of the UNet + text encoder")
    p.add_argument("--init", default=None, help="continue from this pipeline folder (keeps its tokenizer and VAE)")
    p.add_argument("--images_dir", default="images", help="where the loss curve goes")

    p = sub.add_parser("pretrain-flow", help="pretrain the toy flow model (FLUX.2 [klein] architecture; ~90 min, one thread)")
    p.add_argument("--out", default=None, help="pipeline folder to write (default data/toy_flow_model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000, help="transformer + text encoder optimizer steps")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_images", type=int, default=20000, help="size of the rendered pretraining set")
    p.add_argument("--minutes", type=float, default=None, help="stop early after this wall time")
    p.add_argument("--learning_rate", "--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--init", default=None, help="continue from this pipeline folder (a second cycle)")
    p.add_argument("--images_dir", default="images", help="where the loss curve goes")

    p = sub.add_parser("oracle-train", help="train the oracle classifier on rendered pictures (CPU, ~10 min)")
    p.add_argument("--out", default=None, help="folder for oracle.safetensors + oracle.json (default data/oracle)")
    p.add_argument("--vae", default=None, help="pipeline (or vae) folder whose VAE round trip augments training "
                   "(default data/toy_model when it exists)")
    p.add_argument("--no_vae", action="store_true", help="train without the VAE round trip")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--num_images", type=int, default=36000, help="rendered training pictures")
    p.add_argument("--num_vae_images", type=int, default=12000, help="of those, how many also get a VAE round trip")
    p.add_argument("--minutes", type=float, default=30.0, help="cap on rendering + VAE round trips + training "
                   "(a cut-short run anneals early: its result depends on the machine's speed)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("oracle-eval", help="oracle accuracy per head on fresh renderer pictures (JSON)")
    p.add_argument("--oracle", default=None, help="oracle folder (default data/oracle)")
    p.add_argument("--vae", default=None, help="also score VAE round-tripped pictures (pipeline or vae folder)")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--seed", type=int, default=12345)
    p = sub.add_parser("base-eval", help="how often the base model follows class/colour/context/style (JSON)")
    p.add_argument("--model", default=None, help="pipeline folder (default data/toy_model)")
    p.add_argument("--oracle", default=None, help="oracle folder (default data/oracle)")
    p.add_argument("--n", type=int, default=8, help="images per prompt")
    p.add_argument("--guidance_scale", type=float, default=None, help="default: the demo's for the model (SD 7, flow 4)")
    p.add_argument("--num_inference_steps", "--steps", type=int, default=25, help="sampler steps")
    p.add_argument("--no_per_subject", action="store_true", help="skip the per-subject check (every subject's "
                   "prompt suite and class prompt: 19 prompts x n images per subject)")
    for name, what in (("demo", "DreamBooth on a toy subject end to end: train, grids, oracle metrics"),
                       ("ablate", "prior on/off, correct/no/wrong class noun, LoRA: table + figure")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--subject", default="marked_star", help="a folder name under data/subjects")
        p.add_argument("--model", default=None, help="the toy base model: data/toy_model (default, SD architecture) "
                       "or data/toy_flow_model (FLUX.2 [klein] architecture)")
        p.add_argument("--output_dir", default=f"runs/toy_{name}", help="where runs and metrics go")
        p.add_argument("--max_train_steps", "--steps", type=int, default=None, help="override max_train_steps")
        p.add_argument("--seed", type=int, default=None, help="override the training seed (data order, noise, class images)")
        p.add_argument("--images_dir", default=None, help="where figures and tables go (default <output_dir>/figures; "
                       "'images' refreshes the README's committed ones, as make figures / make ablations do)")
    p = sub.add_parser("bench", help="toy DreamBench: subjects x seeds x recipes, 95 %% t-intervals, paired differences")
    p.add_argument("--subjects", nargs="+", default=None, help="a subset of the subjects (default: all 8)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--recipes", nargs="+", default=None, help="a subset of prior no_prior wrong_class_noun "
                   "no_class_noun lora multi_subject (default: all)")
    p.add_argument("--model", default=None, help="the toy base model the runs start from: data/toy_model (default) "
                   "or data/toy_flow_model (its demo recipe; the lora recipe is the toy SD model's only)")
    p.add_argument("--output_dir", default="runs/toy_bench", help="runs, class images and the per-run JSON (one model's)")
    p.add_argument("--images_dir", default=None, help="where toy_bench.{md,png} and toy_bench_runs.json go "
                   "(default <output_dir>/report)")
    p.add_argument("--max_train_steps", "--steps", type=int, default=None,
                   help="steps of every single-subject recipe, for a smoke run (multi_subject: 2x this)")
    p.add_argument("--report_only", action="store_true", help="only rebuild the report from the finished runs' JSON")
    p.add_argument("--keep_weights", action="store_true", help="keep each run's weights (default: deleted once scored)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.command == "pretrain":
        from dreambooth_lib.config import TOY_MODEL_DIR
        from dreambooth_lib.toyworld.pretrain import pretrain

        result = pretrain(out=args.out or TOY_MODEL_DIR, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps,
                          batch_size=args.batch_size, num_images=args.num_images, minutes=args.minutes,
                          lr=args.learning_rate, init=args.init, images_dir=args.images_dir)
        print(json.dumps({k: v for k, v in result.items() if k != "unet_loss"}, indent=1))
    elif args.command == "pretrain-flow":
        from dreambooth_lib.config import TOY_FLOW_MODEL_DIR
        from dreambooth_lib.toyworld.pretrain_flow import pretrain_flow

        result = pretrain_flow(out=args.out or TOY_FLOW_MODEL_DIR, seed=args.seed, steps=args.steps,
                               batch_size=args.batch_size, num_images=args.num_images, minutes=args.minutes,
                               lr=args.learning_rate, images_dir=args.images_dir, init=args.init)
        print(json.dumps({k: v for k, v in result.items() if k != "loss"}, indent=1))
    elif args.command == "oracle-train":
        from pathlib import Path

        from dreambooth_lib.config import TOY_MODEL_DIR
        from dreambooth_lib.toyworld.oracle import ORACLE_DIR
        from dreambooth_lib.toyworld.oracle_training import train_oracle

        default_vae = TOY_MODEL_DIR if (Path(TOY_MODEL_DIR) / "vae").is_dir() else None
        vae = None if args.no_vae else args.vae or default_vae
        print(f"oracle-train: VAE round trip from {vae}" if vae else "oracle-train: no VAE round trip (--vae not given)")
        result = train_oracle(out=args.out or ORACLE_DIR, vae_path=vae, steps=args.steps, minutes=args.minutes,
                              seed=args.seed, num_images=args.num_images, num_vae_images=args.num_vae_images)
        print(json.dumps(result, indent=1))
    elif args.command == "oracle-eval":
        from dreambooth_lib.toyworld.oracle import ORACLE_DIR, load_oracle
        from dreambooth_lib.toyworld.oracle_training import evaluate_oracle, load_vae

        oracle = load_oracle(args.oracle or ORACLE_DIR)
        vae = load_vae(args.vae) if args.vae else None
        print(json.dumps(evaluate_oracle(oracle, args.n, seed=args.seed, vae=vae), indent=1))
    elif args.command == "base-eval":
        from dreambooth_lib.config import TOY_MODEL_DIR
        from dreambooth_lib.toyworld.oracle import ORACLE_DIR, base_eval, load_oracle

        from dreambooth_lib.toyworld.demo import guidance_for

        oracle = load_oracle(args.oracle or ORACLE_DIR)  # fails before the slow pipeline load
        model = args.model or TOY_MODEL_DIR
        guidance = guidance_for(model) if args.guidance_scale is None else args.guidance_scale
        print(json.dumps(base_eval(oracle, model, n=args.n, guidance_scale=guidance,
                                   steps=args.num_inference_steps, per_subject=not args.no_per_subject), indent=1))
    elif args.command in ("demo", "ablate"):
        from pathlib import Path

        from dreambooth_lib.toyworld import demo

        overrides = {k: v for k, v in (("max_train_steps", args.max_train_steps), ("seed", args.seed),
                                        ("model", args.model)) if v is not None}
        images_dir = Path(args.images_dir) if args.images_dir else None
        if args.command == "demo":
            demo.run_demo(args.subject, args.output_dir, images_dir, **overrides)
        else:
            demo.run_ablations(args.subject, args.output_dir, images_dir, **overrides)
    elif args.command == "bench":
        from pathlib import Path

        from dreambooth_lib.config import TOY_MODEL_DIR
        from dreambooth_lib.errors import InputError
        from dreambooth_lib.toyworld import bench

        try:
            if args.report_only:
                root = Path(args.output_dir)
                bench.write_report(root, Path(args.images_dir) if args.images_dir else root / "report")
            else:
                bench.run_bench(args.output_dir, args.subjects, args.seeds, args.recipes, args.max_train_steps,
                                args.keep_weights, args.images_dir, model=args.model or TOY_MODEL_DIR)
        except InputError as err:  # the message says what to do; no traceback
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
