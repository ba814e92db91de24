"""torch.compile for the training step, and the check that the compiled step computes the eager one.

compile="step" compiles the forward + loss (AOTAutograd compiles its backward too), "unet" the
denoiser, "blocks" each repeated transformer block once. check_compiled_gradients runs before the
first step, because a compiler bug once trained silently wrong on the CPU (benchmarks/README.md,
"Compiled step: inductor vs eager on the CPU").
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .errors import CompiledStepMismatch
from .step import TrainingState, micro_step_loss


def compile_options(cfg: TrainConfig, device) -> dict:
    """torch.compile keyword arguments for cfg.compile_backend / compile_mode on `device`.

    Inductor on the CPU runs without its layout optimization: with it, inductor makes the graph's
    activations channels-last for mkldnn's convolutions, and torch 2.13's inductor then reads the
    gradient below each of the UNet's upsamplers (nearest neighbour: a scatter-add into a zero buffer)
    before the scatter-add fills it, so every layer below the first upsampler got a zero gradient
    (benchmarks/README.md, "Compiled step: inductor vs eager on the CPU"). A channels-last model
    (channels_last=True) trips it with or without the option: check_compiled_gradients stops such a run.
    """
    if cfg.compile_backend != "inductor":
        return {"backend": cfg.compile_backend}
    if torch.device(device).type == "cpu":
        return {"backend": "inductor",
                "options": {**torch._inductor.list_mode_options(cfg.compile_mode), "layout_optimization": False}}
    return {"backend": "inductor", "mode": cfg.compile_mode}


def compile_step(cfg: TrainConfig, accelerator, denoiser: torch.nn.Module, loss_fn):
    """(the denoiser the step calls, the loss function) as cfg.compile asks. Called after accelerate's
    prepare (it wraps whatever prepare returned); checkpoints save the uncompiled denoiser."""
    options = compile_options(cfg, accelerator.device)
    if cfg.compile == "unet":
        return torch.compile(denoiser, **options), loss_fn
    if cfg.compile == "blocks":  # regional: each BasicTransformerBlock compiled once, reused by every copy
        accelerator.unwrap_model(denoiser).compile_repeated_blocks(**options)
    elif cfg.compile == "step":  # forward + loss as one graph; AOTAutograd compiles its backward too
        return denoiser, torch.compile(loss_fn, **options)
    return denoiser, loss_fn


def check_compiled_gradients(state: TrainingState, log=print, rtol: float = 0.05) -> dict:
    """Compare the compiled step's loss and per-tensor gradient norms with the eager step's, on the first
    micro-batch the run will train on; raises CompiledStepMismatch when they differ, before any weight moves.

    The eager reference is the same code under torch.compiler.set_stance("force_eager"). A tensor differs
    when |compiled - eager| > rtol x eager + 1e-3 x the largest eager norm (float noise, measured: ~1e-6 on
    the CPU in fp32; a compiler bug zeroed whole tensors). Costs one extra forward + backward. The global
    RNG is restored afterwards and gradients cleared: the run trains as if this had not happened. Skipped
    with LoRA dropout (compiled dropout draws its own masks, so the two passes cannot agree).
    """
    cfg, acc = state.cfg, state.accelerator
    if cfg.use_lora and cfg.lora_dropout > 0:
        log("compile check skipped: lora_dropout > 0 (compiled dropout draws other masks than eager)")
        return {}
    micro_step = state.start_step * cfg.gradient_accumulation_steps

    def loss_and_norms():
        loss_value, _ = micro_step_loss(state, micro_step)
        loss_value.backward()  # unscaled (no fp16 GradScaler): the check never steps the optimizer
        norms = torch.stack([p.grad.detach().float().norm() if p.grad is not None else loss_value.new_zeros(())
                             for p in state.params] + [loss_value.detach().float()])
        for p in state.params:
            p.grad = None
        return norms.tolist()

    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with torch.compiler.set_stance("force_eager"):
            *eager, eager_loss = loss_and_norms()
    with torch.random.fork_rng(devices=devices):
        *compiled, compiled_loss = loss_and_norms()
    if not all(map(math.isfinite, eager + [eager_loss])):
        log("compile check skipped: the eager step's loss or gradients are not finite")
        return {}
    names = {id(p): n for module in state.trained for n, p in acc.unwrap_model(module).named_parameters()}
    floor = 1e-3 * max(eager)
    off = [(names.get(id(p), "?"), e, c) for p, e, c in zip(state.params, eager, compiled)
           if not abs(c - e) <= rtol * e + floor]  # "not <=": NaN counts as different
    result = {"loss": [eager_loss, compiled_loss], "tensors_differing": len(off), "tensors": len(eager)}
    if off or not abs(compiled_loss - eager_loss) <= rtol * abs(eager_loss):
        worst = "; ".join(f"{n}: eager {e:.3g}, compiled {c:.3g}" for n, e, c in off[:3])
        raise CompiledStepMismatch(
            f"torch.compile (compile={cfg.compile!r}, backend {cfg.compile_backend!r}, mode {cfg.compile_mode!r}) computes "
            f"another step than eager PyTorch: loss {compiled_loss:.6g} vs {eager_loss:.6g}, gradient norms of {len(off)} "
            f"of {len(eager)} tensors differ by more than {rtol:.0%} ({worst}). Nothing was trained. This is a compiler "
            "bug (see benchmarks/README.md, 'Compiled step'): train with compile='off'"
            + (", or try compile='blocks' (no convolution or upsampler inside)" if cfg.compile != "blocks" else "")
            + "; compile_check=False skips this check.")
    log(f"compile check: compiled step = eager step (loss {compiled_loss:.6g} vs {eager_loss:.6g}; "
        f"{len(eager)} gradient norms within {rtol:.0%})")
    return result
