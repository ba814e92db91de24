"""python -m dreambooth_lib.toyworld pretrain | demo | ablate | oracle-train | oracle-eval | base-eval"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_lib.toyworld", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain the toy base model (VAE, then UNet + text encoder)")
    p.add_argument("--out", default=None, help="pipeline folder to write (default data/toy_model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=7000, help="UNet optimizer steps")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-images", type=int, default=40000, help="size of the rendered pretraining set")
    p.add_argument("--minutes", type=float, default=None, help="stop early after this wall time")
    args = parser.parse_args(argv)

    if args.command == "pretrain":
        from dreambooth_lib.config import TOY_MODEL_DIR
        from dreambooth_lib.toyworld.pretrain import pretrain

        result = pretrain(out=args.out or TOY_MODEL_DIR, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps,
                          batch_size=args.batch_size, num_images=args.num_images, minutes=args.minutes)
        print(json.dumps({k: v for k, v in result.items() if k != "unet_loss"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
