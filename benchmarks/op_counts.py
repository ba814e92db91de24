"""Operator calls per training step: the CPU proxy of GPU launch overhead that CI can hold.

    python benchmarks/op_counts.py                 # tiny model (CI's baseline) -> results/op_counts.json "tiny"
    python benchmarks/op_counts.py --sd15          # + SD1.5 architecture at 64 px on the CPU ("sd15_64px")
    python benchmarks/op_counts.py --check         # compare the tiny counts with the file (tests do this)
    python benchmarks/op_counts.py --also full-fp16-cached-fast    # + other configs, recorded but not held by CI

On a GPU nearly every dispatcher operator that computes is a kernel launch (~8 us of host time each on
the H200 run of 2026-11-27: ~7,000 launches per step left the GPU idle half the time). torch.profiler
counts them per step on the CPU too, deterministically for a given torch version: a change that adds
per-tensor Python loops or extra casts shows here without a GPU. One step is profiled after two
warm-up steps (the optimizer creates its state on the first), through the benchmark's own
`bench_train.build_state` + `step.train_step`, i.e. the library's training step.

A "+levers" suffix applies issue 11's levers explicitly on the CPU (where "auto" keeps them off):
channels_last, torch AdamW (fused: one optimizer call per step) and no gradient checkpointing.

Counts per config: operator_calls_per_step (all operators, any depth), optimizer_calls_per_step
(operators the optimizer's step() calls directly: one per parameter tensor for a per-tensor optimizer),
optimizer_operator_calls_per_step (everything inside step()). `tests/test_benchmarks.py` fails when a
tiny-model count exceeds the recorded one by more than MARGIN.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import common
from bench_train import build_state, parse_name

from dreambooth_lib import memory, models, step

RESULTS = common.RESULTS_DIR / "op_counts.json"
MARGIN = 0.05  # counts may grow 5 % (a library update's noise) before the test fails; today's runs repeat exactly
COUNTS = ("operator_calls_per_step", "optimizer_calls_per_step", "optimizer_operator_calls_per_step")
CI_CONFIGS = ["full-fp16-cached", "lora4-fp16-cached", "lora4-te-fp16-uncached",
              "full-fp16-cached+levers", "lora4-fp16-cached+levers"]
LEVERS = "+levers"
LEVERS_ON_CPU = dict(channels_last=True, optimizer="adamw", gradient_checkpointing=False)
SD15_CONFIGS = ["full-fp16-cached", "lora4-fp16-cached"]
WARMUP = 2


def count_config(name: str, smoke: bool = True, resolution: int | None = None) -> dict:
    """Profile one training step of config `name` on the CPU; returns its COUNTS (+ the optimizer's name)."""
    cfg, *_ = parse_name(name.removesuffix(LEVERS), smoke, resolution, cpu=True)
    if name.endswith(LEVERS):
        cfg = dataclasses.replace(cfg, **LEVERS_ON_CPU)
    with tempfile.TemporaryDirectory() as workdir:
        state = build_state(cfg, smoke, Path(workdir))
    for i in range(WARMUP):
        step.train_step(state, i)
    summary = common.profile_steps(lambda i: step.train_step(state, WARMUP + i), 1, "cpu")
    return {**{k: summary[k] for k in COUNTS}, "optimizer": models.optimizer_name(state.optimizer),
            "gradient_checkpointing": state.memory_plan.gradient_checkpointing,
            "channels_last": memory.use_channels_last(cfg.channels_last, "cpu"), "compile": cfg.compile,
            "mixed_precision": cfg.mixed_precision, "resolution": cfg.resolution}


def count_configs(names: list[str], smoke: bool = True, resolution: int | None = None) -> dict:
    return {name: count_config(name, smoke, resolution) for name in names}


def regressions(recorded: dict, measured: dict, margin: float = MARGIN) -> list[str]:
    """Counts in `measured` above (1 + margin) x the recorded ones, as readable lines (empty: none)."""
    problems = []
    for name, counts in measured.items():
        if name not in recorded:
            problems.append(f"{name}: no recorded baseline (run `python benchmarks/op_counts.py`)")
            continue
        for key in COUNTS:
            limit = recorded[name][key] * (1 + margin)
            if counts[key] > limit:
                problems.append(f"{name}: {key} {counts[key]:g} > recorded {recorded[name][key]:g} + {margin:.0%}")
    return problems


def section(counts: dict) -> dict:
    env = common.environment("cpu")
    return {"command": env.pop("command"), "environment": env, "counts": counts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sd15", nargs="*", metavar="CONFIG",
                   help=f"also count SD1.5's architecture at 64 px on the CPU (default {SD15_CONFIGS}; "
                        "the full fine-tune needs ~10 GB RAM and minutes)")
    p.add_argument("--check", action="store_true", help="compare tiny-model counts with --results instead of writing")
    p.add_argument("--configs", nargs="+", default=CI_CONFIGS, help="bench_train.py config names (tiny model)")
    p.add_argument("--also", nargs="+", default=[], help="more configs, written to section 'other' (not held by CI)")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    recorded = json.loads(args.results.read_text()) if args.results.is_file() else {}
    tiny = count_configs(args.configs)
    if args.check:
        problems = regressions(recorded.get("tiny", {}).get("counts", {}), tiny)
        print("\n".join(problems) or f"no count above {args.results} + {MARGIN:.0%}")
        return 1 if problems else 0
    out = dict(recorded, about=__doc__.split("\n")[0], margin=MARGIN, tiny=section(tiny))
    if args.also:
        out["other"] = section(count_configs(args.also))
    if args.sd15 is not None:
        out["sd15_64px"] = section(count_configs(args.sd15 or SD15_CONFIGS, smoke=False, resolution=64))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.results)
    for part in ("tiny", "other", "sd15_64px"):
        for name, counts in out.get(part, {}).get("counts", {}).items():
            print(part, name, {k: counts[k] for k in COUNTS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
