"""Compiled step vs eager step on the CPU with the real inductor backend: same loss, gradients, weights?

    python benchmarks/compile_check.py                          # CONFIGS, 1 thread -> results/compile_check.json
    python benchmarks/compile_check.py --threads 2 --configs step-adamw unet-adamw blocks-adamw

The tests hold the compiled step with the `aot_eager` backend (same graphs, no generated kernels), because
inductor takes minutes to compile the tiny model's step on this 2-core CPU. This script runs inductor itself.
Each config trains the tiny model (`dreambooth_lib.tiny`, 32 px, fp32, lr 1e-3, no prior) for 3 steps through
`train.prepare_training` + `step.train_step` in a fresh process with an empty inductor cache, and is compared
with the eager run of the same optimizer / checkpointing / layout:

- `loss_rel_diff`: |compiled - eager| / eager per step;
- `grad_max_diff`: largest |compiled - eager| over the first step's gradients (as the optimizer gets them, after
  clipping), over the largest eager gradient; `zero_grad_tensors`: tensors whose compiled gradient is all zero;
- `weights_max_diff`, `weights_moved`: after 3 steps, largest weight difference and elements apart by > 1e-4;
- `compile_s`: first step's wall time minus the median of the later (compiled, warm) steps.

Config names: `{off|step|unet|blocks}-{adamw|adamw8bit}[-gc][-cl][-unfixed]`: `gc` = gradient checkpointing,
`cl` = channels_last=True, `unfixed` = without `compiled.compile_options`' CPU workaround (inductor's layout
optimization left on, as before the fix): reproduces the bug the workaround avoids.

`--minimal nchw` (or `nchw-no-layout-opt`, `channels-last-no-layout-opt`) runs the bug's five-block reproduction
without the library (diffusers blocks only; ~1 min to compile here).

On a machine with CUDA the runs go to the GPU (accelerate's choice), e.g. to check the compiled step there:
`python benchmarks/compile_check.py --configs step-adamw step-adamw-cl unet-adamw-cl blocks-adamw-cl`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch
from PIL import Image

from dreambooth_lib import compiled, data, models, step, train
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.tiny import save_tiny_pipeline

RESULTS = common.RESULTS_DIR / "compile_check.json"
STEPS = 3
CONFIGS = ["step-adamw-unfixed", "step-adamw", "step-adamw8bit", "step-adamw-gc", "step-adamw8bit-gc",
           "unet-adamw", "unet-adamw-gc", "blocks-adamw", "blocks-adamw-gc", "step-adamw-cl"]


def parse(name: str) -> dict:
    mode, optimizer, *flags = name.split("-")
    unknown = set(flags) - {"gc", "cl", "unfixed"}
    if mode not in ("off", "step", "unet", "blocks") or optimizer not in ("adamw", "adamw8bit") or unknown:
        raise SystemExit(f"unknown config {name!r}: {{off|step|unet|blocks}}-{{adamw|adamw8bit}}[-gc][-cl][-unfixed]")
    return dict(compile=mode, optimizer=optimizer, gradient_checkpointing="gc" in flags,
                channels_last="cl" in flags, unfixed="unfixed" in flags)


def reference(name: str) -> str:
    """The eager config a compiled one is compared with."""
    p = parse(name)
    return "-".join(["off", p["optimizer"]] + (["gc"] if p["gradient_checkpointing"] else [])
                    + (["cl"] if p["channels_last"] else []))


def make_assets(folder: Path) -> None:
    save_tiny_pipeline(folder / "model")
    rng = np.random.default_rng(0)
    (folder / "photos").mkdir()
    for i in range(4):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.integers(-30, 31, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / "photos" / f"photo{i}.png")


def child(name: str, assets: Path, out: Path) -> None:
    """One config: 3 steps; losses, first-step gradients, weights and step times into `out` (torch.save)."""
    p = parse(name)
    if p["unfixed"]:  # the compile arguments as before the CPU workaround
        compiled.compile_options = lambda cfg, device: dict(backend=cfg.compile_backend, mode=cfg.compile_mode)
    cfg = TrainConfig(pretrained_model=str(assets / "model"), instance_dir=str(assets / "photos"), class_noun="dog",
                      identifier="sks", resolution=32, with_prior_preservation=False, max_train_steps=STEPS,
                      learning_rate=1e-3, mixed_precision="no", optimizer=p["optimizer"],
                      gradient_checkpointing=p["gradient_checkpointing"], channels_last=p["channels_last"],
                      compile=p["compile"], compile_backend="inductor", compile_check=False,
                      output_dir=str(out.parent / "run"))
    tokenizer = models.load_tokenizer(cfg)
    images = data.load_instance_images(cfg.instance_dir, cfg.resolution)
    values = data.pixel_values([im.image for im in images], cfg, torch.Generator().manual_seed(0))
    state = train.prepare_training(cfg, models.load_models(cfg), train.make_accelerator(cfg), tokenizer, values,
                                   ["a photo of sks dog"] * len(values), log=lambda _: None)
    grads, real_step = [], state.optimizer.step
    state.optimizer.step = lambda *a, **k: grads.append([q.grad.clone() for q in state.params]) or real_step(*a, **k)
    losses, times = [], []
    for i in range(STEPS):
        started = time.perf_counter()
        losses.append(step.train_step(state, i)["loss"])
        times.append(time.perf_counter() - started)
    names = {id(q): n for n, q in state.models.unet.named_parameters()}
    torch.save(dict(losses=losses, times=times, grads=grads[0], names=[names[id(q)] for q in state.params],
                    weights=[q.detach().clone() for q in state.params]), out)


def run(name: str, assets: Path, workdir: Path, threads: int) -> dict:
    out = workdir / f"{name}.pt"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TORCHINDUCTOR_CACHE_DIR=str(workdir / f"inductor-{name}"),
               HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--assets", str(assets), "--out", str(out)],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return {"process_s": round(time.perf_counter() - started, 1), **torch.load(out)}


def compare(eager: dict, compiled: dict) -> dict:
    scale = max(g.abs().max().item() for g in eager["grads"])
    grad_diff = max((c - e).abs().max().item() for e, c in zip(eager["grads"], compiled["grads"]))
    zeroed = [n for n, e, c in zip(eager["names"], eager["grads"], compiled["grads"])
              if c.abs().max() == 0 and e.abs().max() > 0]
    weight_diff = [(c - e).abs() for e, c in zip(eager["weights"], compiled["weights"])]
    return dict(loss_rel_diff=[abs(c - e) / abs(e) for e, c in zip(eager["losses"], compiled["losses"])],
                grad_max_diff=grad_diff / scale, zero_grad_tensors=len(zeroed), zero_grad_examples=zeroed[:3],
                weights_max_diff=max(d.max().item() for d in weight_diff),
                weights_moved=sum(d.gt(1e-4).sum().item() for d in weight_diff),
                weights=sum(d.numel() for d in weight_diff), tensors=len(weight_diff))


def minimal(channels_last: bool, layout_optimization: bool) -> dict:
    """The bug without the library: five diffusers blocks (resnet, downsampler, resnet, upsampler, resnet on the
    skip concatenation), inductor vs eager gradients. Prints and returns the tensors whose gradient differs."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in, self.temb = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Linear(8, 16)
            self.res0 = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4)
            self.down = Downsample2D(8, use_conv=True, out_channels=8, padding=1, name="op")
            self.res1 = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=16, groups=4)
            self.up = Upsample2D(16, use_conv=True, out_channels=16)
            self.res2 = ResnetBlock2D(in_channels=24, out_channels=8, temb_channels=16, groups=4)
            self.conv_out = torch.nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x, emb):
            emb = torch.nn.functional.silu(self.temb(emb))
            skip = self.res0(self.conv_in(x), emb)
            h = self.up(self.res1(self.down(skip), emb))
            return self.conv_out(self.res2(torch.cat([h, skip], 1), emb))

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # does CUDA's inductor have the bug too? (gpu_check)
    net, x, emb = Net().to(device), torch.randn(2, 4, 16, 16, device=device), torch.randn(2, 8, device=device)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def grads(model):
        net.zero_grad(set_to_none=True)
        model(x, emb).pow(2).mean().backward()
        return {n: q.grad.clone() for n, q in net.named_parameters()}

    eager = grads(net)
    compiled = grads(torch.compile(net, options={"layout_optimization": layout_optimization}))
    scale = max(g.abs().max().item() for g in eager.values())
    differ = [n for n in eager if (compiled[n] - eager[n]).abs().max().item() > 1e-4 * scale]
    zeroed = [n for n in differ if compiled[n].abs().max() == 0]
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                  channels_last=channels_last, layout_optimization=layout_optimization, tensors=len(eager),
                  differ=len(differ), zeroed=zeroed)
    print(json.dumps(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each config's process")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--minimal", choices=["nchw", "nchw-no-layout-opt", "channels-last", "channels-last-no-layout-opt"],
                    help="only the five-block reproduction of the bug, without the library, on CUDA when there is "
                         "one (prints; with --out, appends the record to that JSON list)")
    ap.add_argument("--child"), ap.add_argument("--assets"), ap.add_argument("--out")
    args = ap.parse_args()
    if args.minimal:
        result = minimal(args.minimal.startswith("channels-last"), not args.minimal.endswith("no-layout-opt"))
        if args.out:
            common.append_results(args.out, [result])
        return
    if args.child:
        return child(args.child, Path(args.assets), Path(args.out))
    for name in args.configs:
        parse(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where accelerate puts the run
    env = common.environment(device)
    note = ("CPU (2 cores, shared with other jobs: times are loaded-machine figures)" if device == "cpu" else
            "CUDA: fp32 convolutions may use TF32 (eager and compiled alike); '-unfixed' = fixed (the workaround is CPU-only)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_assets(workdir / "assets")
        runs = {}
        for name in args.configs:
            for needed in (reference(name), name):
                if needed not in runs:
                    runs[needed] = run(needed, workdir / "assets", workdir, args.threads)
                    print(needed, [round(x, 7) for x in runs[needed]["losses"]],
                          "step s:", [round(t, 2) for t in runs[needed]["times"]], flush=True)
            eager, compiled = runs[reference(name)], runs[name]
            warm = statistics.median(compiled["times"][1:])
            record = dict(config=name, reference=reference(name), threads=args.threads, steps=STEPS,
                          losses=compiled["losses"], eager_losses=eager["losses"], **compare(eager, compiled),
                          first_step_s=round(compiled["times"][0], 2), warm_step_s=round(warm, 3),
                          eager_step_s=round(statistics.median(eager["times"][1:]), 3),
                          compile_s=round(compiled["times"][0] - warm, 1), process_s=compiled["process_s"],
                          device_note=note, **env)
            print(json.dumps({k: record[k] for k in ("config", "loss_rel_diff", "grad_max_diff", "zero_grad_tensors",
                                                     "weights_moved", "compile_s")}), flush=True)
            common.append_results(args.results, [record])


if __name__ == "__main__":
    main()
