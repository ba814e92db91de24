"""Disk space: what a run will write, estimated before it writes, and checked against the free space.

A full SD1.5 fine-tune's checkpoint is ~5 GB (fp32 UNet + 8-bit Adam states) and its final pipeline
~4-5 GB more: on a Colab disk the run would die at its first checkpoint, hours in. So the sizes are
estimated before the first step (from the live modules and optimizer, or earlier still from the base
model's safetensors headers) and a run that cannot fit is refused with what to do.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from . import distributed, families
from .checkpoint import STATE_JSON, complete_checkpoints, encode_state
from .config import TrainConfig
from .errors import InputError
from .families import Models
from .weights import lora_layers


def safetensors_bytes(tensors: dict) -> int:
    """Size of a safetensors file of `tensors`: their bytes, plus a header entry each (name, dtype,
    shape, offsets: ~ the name + 80 bytes of JSON)."""
    return 8 + sum(t.numel() * t.element_size() + len(name) + 80 for name, t in tensors.items())


def weights_bytes(trained: list[torch.nn.Module], cfg: TrainConfig) -> int:
    """What save_weights writes for the (unwrapped) trained modules: the LoRA layers in one file with
    each module's LoraConfig as metadata, or each module's state dict + config.json (save_pretrained)."""
    if cfg.use_lora:
        return sum(safetensors_bytes(lora_layers(m)) + 2048 for m in trained)
    return sum(safetensors_bytes(m.state_dict()) + 4096 for m in trained)


def optimizer_state_bytes(optimizer) -> int:
    """What save_training_state writes for the optimizer, known before its first step creates the state.

    torch AdamW: exp_avg, exp_avg_sq in the parameter's dtype and a step. The 8-bit AdamWs (bitsandbytes,
    torchao): a tensor of >= 4096 values keeps each state in 1 byte per value + an fp32 scale per block
    of 256 values + its 256-entry fp32 quantization map; smaller tensors keep fp32 states. Each stored
    tensor also costs a safetensors header entry and a JSON reference (~200 bytes)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    eight_bit = "8bit" in type(inner).__name__
    return sum(adam_state_bytes(p.numel(), p.element_size(), eight_bit) for g in inner.param_groups for p in g["params"])


def adam_state_bytes(n: int, element_size: int, eight_bit: bool) -> int:
    """Saved AdamW state of one parameter tensor of n values (see optimizer_state_bytes)."""
    if eight_bit and n >= 4096:
        states = [n, n, 4 * math.ceil(n / 256), 4 * math.ceil(n / 256), 4 * 256, 4 * 256]
    elif eight_bit:
        states = [4 * n, 4 * n]  # bitsandbytes keeps its step as a JSON number
    else:
        states = [n * element_size, n * element_size, 4]
    return sum(states) + 200 * len(states)


def checkpoint_bytes(trained: list[torch.nn.Module], optimizer, cfg: TrainConfig, num_processes: int = 1) -> int:
    """Estimated size of one checkpoint-N: weights + optimizer + lr schedule, every process's RNG states,
    loss history (at most max_train_steps records) and config."""
    return (weights_bytes(trained, cfg) + optimizer_state_bytes(optimizer) + rng_bytes(num_processes)
            + 160 * cfg.max_train_steps + len(json.dumps(cfg.to_dict())) + 1024)


def rng_bytes(num_processes: int) -> int:
    """The RNG states a checkpoint stores: this process's, encoded as save_training_state does, per process."""
    tensors = {}
    encoded = len(json.dumps(encode_state(distributed.rng_state(), "rng", tensors)))
    return num_processes * (encoded + safetensors_bytes(tensors))


def final_bytes(models: Models | None, cfg: TrainConfig, lora_bytes: int = 0) -> int | None:
    """Estimated size of what save_final writes: the LoRA file, or a whole pipeline in save_precision:
    every module (trained or frozen) at that dtype, plus the base model's parts this run did not load
    (e.g. SD1.5's safety_checker, counted from its safetensors headers) and small files (tokenizers,
    configs) as they are in the base model's folder (a hub model's: from the local cache when there).
    models=None: every part from the base model's headers (None when they are not on this machine)."""
    if cfg.use_lora:
        return lora_bytes
    size = {"fp32": 4, "fp16": 2, "bf16": 2}[cfg.save_precision]
    loaded = {} if models is None else {"unet": models.unet, "vae": models.vae,
                                         **dict(zip(families.of(cfg).TEXT_ENCODERS, models.text_encoders))}
    total = sum(t.numel() * size + len(k) + 80 for m in loaded.values() for k, t in m.state_dict().items())
    base = base_model_folder(cfg.pretrained_model, cfg.revision)
    if base is None:
        return None if models is None else total + 4 * 2**20  # tokenizer files and configs
    parts = [k for k, v in families.model_index(str(base)).items() if isinstance(v, list) and v[0] is not None]
    for path in [base / "model_index.json", *(p for part in parts for p in (base / part).rglob("*") if p.is_file())]:
        if path.suffix not in (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx"):
            total += path.stat().st_size
        elif path.suffix == ".safetensors" and "." not in path.stem and path.relative_to(base).parts[0] not in loaded:
            # a part this run did not load ("model.fp16.safetensors": a variant from_pretrained skips)
            total += sum(n * size + 100 for n in safetensors_numels(path))  # + its header entry
    return total


def safetensors_numels(path: Path) -> list[int]:
    """The number of values of each tensor in a safetensors file, from its header (no data read)."""
    with safe_open(path, "pt") as f:
        return [math.prod(f.get_slice(k).get_shape()) for k in f.keys()]


def early_disk_check(cfg: TrainConfig, resume_from: Path | None = None, num_processes: int = 1) -> dict | None:
    """Before class images and models: a full fine-tune's check_disk_space from the base model's
    safetensors headers (fp32 trained weights, 8-bit optimizer states unless optimizer='adamw': the
    smallest the run can write), so a disk that cannot even hold that is refused in seconds. LoRA
    files are megabytes: their exact check comes once the adapters exist (train, check_disk_space).
    Returns check_disk_space's numbers; None where there is nothing to estimate from (LoRA, weights not
    on this machine or not as safetensors)."""
    base = base_model_folder(cfg.pretrained_model, cfg.revision) if not cfg.use_lora else None
    final = final_bytes(None, cfg) if base is not None else None
    if final is None:
        return None
    trained = ["unet", *(families.of(cfg).TEXT_ENCODERS if cfg.train_text_encoder else ())]
    files = [p for part in trained for p in (base / part).glob("*.safetensors") if "." not in p.stem]
    if len({p.parent.name for p in files}) < len(trained):  # weights of a variant or a .bin only: no estimate
        return None
    numels = [n for path in files for n in safetensors_numels(path)]
    eight_bit = cfg.optimizer != "adamw"
    checkpoint = (sum(4 * n + 100 for n in numels) + sum(adam_state_bytes(n, 4, eight_bit) for n in numels)
                  + rng_bytes(num_processes) + 160 * cfg.max_train_steps)
    start_step = json.loads((resume_from / STATE_JSON).read_text())["global_step"] if resume_from else 0
    return check_disk_space(cfg, checkpoint, final, start_step, log=lambda *_: None)  # the warning: once, later


def base_model_folder(model: str, revision: str | None) -> Path | None:
    """A local pipeline folder, or a hub model's cached snapshot; None when it is not on this machine."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # not cached (yet): the estimate then leaves out the parts this run did not load
        return None


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_disk_space(cfg: TrainConfig, checkpoint: int, final: int, start_step: int, log=print, free: int | None = None) -> dict:
    """Refuse a run whose first checkpoint + final weights cannot fit on output_dir's disk; warn when
    all the checkpoints it keeps would not. Returns the numbers (summary["disk"]).

    Checkpoints kept: checkpoints_total_limit (None = all of them), and one more while a new one is
    written before the oldest is pruned. Checkpoints already in output_dir (a resumed run) are in the
    disk's used space; pruning frees them as new ones are written."""
    output_dir = Path(cfg.output_dir).absolute()
    existing_dir = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    free = shutil.disk_usage(existing_dir).free if free is None else free
    every, limit = cfg.checkpointing_steps, cfg.checkpoints_total_limit
    to_write = cfg.max_train_steps // every - start_step // every if every else 0
    old = len(complete_checkpoints(output_dir))

    def needed(n: int, keep: int | None) -> int:  # the most new bytes at once: n checkpoints, then the final weights
        if keep is None:
            return n * checkpoint + final
        while_writing = max(0, min(keep + 1, old + n) - old) * checkpoint if n else 0
        return max(while_writing, max(0, min(keep, old + n) - old) * checkpoint + final)

    first, everything = needed(min(to_write, 1), limit), needed(to_write, limit)
    what = "LoRA file" if cfg.use_lora else f"{cfg.save_precision} pipeline"
    numbers = dict(checkpoint_bytes=checkpoint, final_bytes=final, free_bytes=free, needed_bytes=everything)
    if first > free:
        todo = ["free space on that disk", "set output_dir to a disk with more room"]
        if not cfg.use_lora:
            todo.append("train LoRA (use_lora=True: megabytes instead of gigabytes)")
            if cfg.save_precision == "fp32":
                todo.append("save_precision='fp16' (half the final pipeline)")
        if to_write:
            todo.append("checkpointing_steps=0 (no checkpoints; a crash then loses the run)")
        ckpt = f"one checkpoint ({human_bytes(checkpoint)}) + " if to_write else ""
        raise InputError(
            f"not enough disk space in output_dir {output_dir}: {ckpt}the final {what} ({human_bytes(final)}) need "
            f"{human_bytes(first)}, {human_bytes(free)} is free (shutil.disk_usage of {existing_dir}). No training "
            "step was run. Do one of: " + "; ".join(todo) + ".")
    if everything > free:
        kept = ("all are kept" if limit is None else
                f"checkpoints_total_limit={limit} keeps {limit}, and {limit + 1} exist while the next is written")
        fits = [k for k in range(1, (limit or to_write) + 1) if needed(to_write, k) <= free]
        hint = f"Set checkpoints_total_limit={fits[-1]}" if fits else "Write fewer checkpoints (checkpointing_steps)"
        log(f"warning: disk space: the {to_write} checkpoints of this run ({human_bytes(checkpoint)} each; {kept}) and "
            f"the final {what} ({human_bytes(final)}) need up to {human_bytes(everything)} in {output_dir}, and "
            f"{human_bytes(free)} is free: the run would stop with an error when the disk fills (earlier checkpoints "
            f"stay intact). {hint}, free space, or move output_dir.")
    return numbers
