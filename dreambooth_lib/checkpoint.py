"""Checkpoints: written durably, found, checked for damage, and resumed exactly.

A checkpoint-N folder holds the trained weights (weights.py) and the training state: optimizer, lr
schedule, every process's RNG states and the loss history, as safetensors + JSON (no pickles, so
nothing runs on load). Exact resume: with these and the per-micro-step draws of step.py, a resumed run
makes the same steps as an uninterrupted one. The final weights are saved here too, with the same
care: temp folder, fsync, rename; a full disk leaves the last checkpoint intact and says so.
"""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import distributed, families
from .config import TrainConfig
from .errors import InputError, SaveFailed
from .families import as_tuple
from .fsio import fsync, fsync_tree, follow_umask, is_write_failure, publish, write_failure_reason
from .memory import torch_dtype
from .weights import LORA_WEIGHTS, save_weights

STATE_JSON, STATE_TENSORS = "training_state.json", "training_state.safetensors"


# Optimizer states that are tensor subclasses: torchao's low-bit AdamW keeps each state as codes + scales (+ a
# quantisation map). They are stored as those plain tensors plus their flat attributes and rebuilt on load;
# a file can name only these classes (nothing else named in a checkpoint is ever imported).
STATE_SUBCLASSES = ("torchao.optim.subclass_8bit.OptimState8bit", "torchao.optim.subclass_4bit.OptimState4bit",
                    "torchao.optim.subclass_fp8.OptimStateFp8")


def encode_state(obj, key: str, tensors: dict):
    """JSON-able copy of a state dict; tensors go to `tensors` (safetensors) and leave a reference."""
    if isinstance(obj, torch.Tensor) and type(obj) is not torch.Tensor:
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if name not in STATE_SUBCLASSES:
            raise TypeError(f"cannot store a {name} at {key} in a training state (known subclasses: {STATE_SUBCLASSES})")
        inner, attrs = obj.__tensor_flatten__()
        return {"__subclass__": name, "tensors": {n: encode_state(getattr(obj, n), f"{key}.{n}", tensors) for n in inner},
                "attrs": [{"__dtype__": str(a).removeprefix("torch.")} if isinstance(a, torch.dtype)
                          else list(a) if isinstance(a, torch.Size) else a for a in attrs]}
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone()  # clone: bnb shares its quantization maps between params
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, encode_state(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [encode_state(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {key} in a training state")


def decode_state(obj, tensors: dict):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__subclass__" in obj:
        if obj["__subclass__"] not in STATE_SUBCLASSES:
            raise InputError(f"the training state names an unknown tensor class {obj['__subclass__']!r}; "
                                  f"only {STATE_SUBCLASSES} are rebuilt")
        module, _, name = obj["__subclass__"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        attrs = [getattr(torch, a["__dtype__"]) if isinstance(a, dict) else a for a in obj["attrs"]]
        return cls.__tensor_unflatten__({n: decode_state(v, tensors) for n, v in obj["tensors"].items()}, attrs, None, None)
    if isinstance(obj, dict):
        return {k: decode_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    return obj


def save_training_state(folder: Path, step: int, optimizer, lr_scheduler, history: list[dict], cfg: TrainConfig,
                        rng_states: list[dict] | None = None, fsdp_optimizer_state: dict | None = None) -> None:
    """Optimizer + lr schedule + RNG states as safetensors + JSON (no pickles, so nothing runs on load).

    rng_states: every process's distributed.rng_state() in rank order (distributed.gather_rng_states);
    None = this process's only (one process). Optimizer and schedule are the same on every process.
    fsdp_optimizer_state: under FSDP, the whole optimizer state gathered from the shards
    (distributed.full_optimizer_state, keyed by parameter names), stored instead of optimizer.state_dict().
    """
    rng_states = [distributed.rng_state()] if rng_states is None else rng_states
    tensors = {}
    fsdp = fsdp_optimizer_state is not None
    state = dict(
        global_step=step,
        num_processes=len(rng_states),
        sharding="fsdp" if fsdp else None,  # how the optimizer state is keyed, and how it is loaded back
        optimizer=encode_state(fsdp_optimizer_state if fsdp else optimizer.state_dict(), "optimizer", tensors),
        lr_scheduler=encode_state(lr_scheduler.state_dict(), "lr_scheduler", tensors),
        rng=encode_state(rng_states, "rng", tensors),  # rng[r] = process r's python / numpy / torch / cuda states
        history=history,
        config=cfg.to_dict(),  # sample.load_pipeline finds the base model here
    )
    save_file(tensors, folder / STATE_TENSORS)
    (folder / STATE_JSON).write_text(json.dumps(state))


def checkpoint_processes(folder: Path) -> int:
    """How many processes wrote checkpoint `folder` (each process's RNG state is in it)."""
    return json.loads((folder / STATE_JSON).read_text()).get("num_processes", 1)  # 1: before several were stored


def check_processes(folder: Path, num_processes: int) -> None:
    written = checkpoint_processes(folder)
    if written != num_processes:
        raise InputError(
            f"{folder} was written by a run of {written} process(es) and this run has {num_processes}: the data "
            "each process sees and its random draws depend on the number of processes, so the resumed run would "
            f"not continue the same training. Resume with {written} process(es) (accelerate launch --num_processes "
            f"{written}), or start a new run (resume=None) and load the weights yourself")


def check_sharding(folder: Path, fsdp: bool) -> None:
    """A checkpoint's optimizer state is FSDP's (keyed by parameter names) or a plain optimizer's: resumed alike."""
    written = json.loads((folder / STATE_JSON).read_text()).get("sharding") == "fsdp"
    if written != fsdp:
        how = ("with FSDP (accelerate launch --config_file configs/accelerate_fsdp.yaml)" if written
               else "without FSDP (a launch without an FSDP config)")
        raise InputError(f"{folder} was written by a run {'with' if written else 'without'} FSDP and this run is "
                         f"{'sharded' if fsdp else 'not'}: its optimizer state is stored for that kind of run. Resume "
                         f"{how}, or start a new run (resume=None)")


def load_training_state(folder: Path, optimizer, lr_scheduler, rank: int = 0, num_processes: int = 1,
                        fsdp_module: torch.nn.Module | None = None) -> tuple[int, list[dict]]:
    """Restore optimizer, lr schedule and process `rank`'s RNG states; returns (step, history).
    fsdp_module: the FSDP-sharded model the optimizer steps: the main process reads the whole optimizer state
    and each process gets its shard (a collective); the others read only their RNG states from the file."""
    check_processes(folder, num_processes)
    check_sharding(folder, fsdp_module is not None)
    skip = "optimizer." if fsdp_module is not None and rank > 0 else None
    with safe_open(folder / STATE_TENSORS, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if skip is None or not k.startswith(skip)}
    state = json.loads((folder / STATE_JSON).read_text())
    if fsdp_module is not None:
        distributed.set_full_optimizer_state(fsdp_module, optimizer,
                                             decode_state(state["optimizer"], tensors) if rank == 0 else {})
    else:
        optimizer.load_state_dict(decode_state(state["optimizer"], tensors))
    lr_scheduler.load_state_dict(decode_state(state["lr_scheduler"], tensors))
    if "rng" in state:
        distributed.set_rng_state(decode_state(state["rng"], tensors)[rank])
    else:  # written before every process's state was stored: one process, flat keys
        distributed.set_rng_state(dict(python=state["rng_python"], numpy=state["rng_numpy"], torch=tensors["rng.torch"],
                                       cuda=[tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]))
    return state["global_step"], state["history"]


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint-N folders of a run that were published whole (a half-written .tmp-checkpoint-N
    never is), oldest first."""
    return sorted((p for p in Path(output_dir).glob("checkpoint-*") if (p / STATE_JSON).is_file()), key=checkpoint_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete checkpoint-N (half-written .tmp-checkpoint-N folders never count)."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def resolve_resume(cfg: TrainConfig, log=print, num_processes: int = 1, family=None, fsdp: bool = False) -> Path | None:
    """The checkpoint to resume from (None: a new run), checked before any model is loaded: its files
    are whole (check_checkpoint), it was written by as many processes, sharded alike (fsdp), it holds the
    weights cfg trains.

    resume="latest" never skips a damaged newest checkpoint on its own: the error names it and the
    newest earlier complete one, so the user decides to go back (and lose those steps) knowingly."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        path = latest_checkpoint(cfg.output_dir)
        if path is None:
            log(f"resume='latest': no checkpoint in {cfg.output_dir}; starting a new run")
            return None
    else:
        path = Path(cfg.resume)
        if not (path / STATE_JSON).is_file():
            raise InputError(f"resume={cfg.resume!r}: no {STATE_JSON} there; pass a checkpoint-N folder or 'latest'")
    check_checkpoint(path)
    check_processes(path, num_processes)  # before anything is loaded
    check_sharding(path, fsdp)
    weights = path / LORA_WEIGHTS if cfg.use_lora else path / (family or families.of(cfg)).DENOISER
    if not weights.exists():
        raise InputError(f"{path} holds no {weights.name} (use_lora={cfg.use_lora} needs it): it was saved by a "
                              f"{'full fine-tune' if cfg.use_lora else 'LoRA run'}; resume with the use_lora it was trained with")
    return path


def checkpoint_damage(folder: Path) -> str | None:
    """Why checkpoint `folder` cannot be read whole ("<file>: <reason>"), or None. Every .json must parse
    and every .safetensors header must describe exactly the file's bytes (safetensors checks that when
    opening), which a truncated, emptied or overwritten file fails. Headers only: seconds for several GB.
    Flipped bits inside tensor data of the right length are not found (checkpoints store no checksums)."""
    required = [folder / STATE_JSON, folder / STATE_TENSORS]
    for path in required + sorted(p for p in folder.rglob("*") if p.suffix in (".json", ".safetensors") and p not in required):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            else:
                with safe_open(path, "pt"):
                    pass
        except FileNotFoundError:
            return f"{path} is missing"
        except (ValueError, SafetensorError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return f"{path} is cut short or corrupt: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


def earlier_intact_checkpoint(folder: Path) -> Path | None:
    """The newest complete, undamaged checkpoint-N beside `folder` with a smaller step, or None."""
    try:
        below = checkpoint_step(folder)
    except (IndexError, ValueError):  # a folder not named checkpoint-N: any checkpoint beside it
        below = math.inf
    for path in reversed([p for p in complete_checkpoints(folder.parent) if p != folder and checkpoint_step(p) < below]):
        if checkpoint_damage(path) is None:
            return path
    return None


def check_checkpoint(folder: Path) -> None:
    """InputError naming the damaged file of checkpoint `folder` and what to resume from instead."""
    damage = checkpoint_damage(folder)
    if damage is None:
        return
    earlier = earlier_intact_checkpoint(folder)
    if earlier is not None:
        instead = (f"The newest earlier complete checkpoint is {earlier}: resume from it with resume={str(earlier)!r} "
                   f"(CLI: --resume {earlier}), or delete {folder} and resume='latest' will pick it")
    else:
        instead = (f"No earlier complete checkpoint is in {folder.parent}: delete {folder} and start a new run "
                   "(resume=None)")
    raise InputError(f"checkpoint {folder} is damaged and cannot be resumed ({damage}); a disk that filled up "
                          f"or a copy that stopped early leaves files like this. {instead}.")


def save_failed(what: str, path: Path, output_dir: Path, err: BaseException, left: str = "") -> SaveFailed:
    """The error a failed write raises: what and where, why, which checkpoint is intact, how to go on."""
    intact = latest_checkpoint(output_dir)
    if intact is not None:
        resume = (f"{intact} is intact: free space (or move output_dir to a bigger disk), then rerun with "
                  f"resume='latest' (CLI: --resume latest) to continue from step {checkpoint_step(intact)}")
    else:
        resume = "no checkpoint was written before: free space (or pick another output_dir) and start the run again"
    room = ""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) or re.search(r"os error (28|122)\b", str(err)):
        room = (" Less to write: checkpoints_total_limit=1 keeps one checkpoint, use_lora=True saves megabytes "
                "instead of gigabytes, save_precision='fp16' halves a full fine-tune's final pipeline.")
    left = left or "what was half-written was removed"
    failure = SaveFailed(f"could not write {what} {path}: {write_failure_reason(err)}. {left[0].upper() + left[1:]}; "
                         f"{resume}.{room}")
    failure.errno = err.errno if isinstance(err, OSError) else None
    return failure


def save_checkpoint(output_dir: str | Path, step: int, denoiser, text_encoder, optimizer, lr_scheduler,
                    history: list[dict], cfg: TrainConfig, rng_states: list[dict] | None = None, family=None,
                    fsdp_optimizer_state: dict | None = None) -> Path:
    """Write checkpoint-N durably (temp folder, fsync, rename, fsync), then prune to checkpoints_total_limit.
    Called by the main process only, with every process's rng_states (see save_training_state); under FSDP
    with the denoiser and optimizer state gathered whole (distributed.unsharded_copy, full_optimizer_state)."""
    output_dir = Path(output_dir)
    tmp, final = output_dir / f".tmp-checkpoint-{step}", output_dir / f"checkpoint-{step}"
    old = output_dir / f".old-checkpoint-{step}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(tmp, denoiser, text_encoder, cfg, family)
        save_training_state(tmp, step, optimizer, lr_scheduler, history, cfg, rng_states, fsdp_optimizer_state)
        shutil.rmtree(old, ignore_errors=True)  # left by a crash during an earlier re-save
        if final.exists():  # re-saving a step after resuming from an earlier checkpoint
            os.replace(final, old)
        publish(tmp, final)
    except (OSError, SafetensorError) as err:
        if not is_write_failure(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: the half-written folder only takes what is left
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise save_failed(f"checkpoint-{step}", tmp, output_dir, err) from err
    shutil.rmtree(old, ignore_errors=True)
    if cfg.checkpoints_total_limit is not None:
        done = sorted(output_dir.glob("checkpoint-*"), key=checkpoint_step)
        for stale in done[:-cfg.checkpoints_total_limit]:
            shutil.rmtree(stale)
    return final


def save_final(output_dir: str | Path, denoiser, text_encoder, cfg: TrainConfig, family=None) -> Path:
    """LoRA: output_dir/pytorch_lora_weights.safetensors. Full: a complete diffusers pipeline folder.
    Both fsynced; the LoRA file replaces an older one atomically (written beside it, then renamed)."""
    output_dir = Path(output_dir)
    try:
        return _save_final(output_dir, denoiser, text_encoder, cfg, family or families.of(cfg))
    except (OSError, SafetensorError) as err:
        if not is_write_failure(err):
            raise
        shutil.rmtree(output_dir / ".tmp-final", ignore_errors=True)
        if cfg.use_lora:
            raise save_failed("the final LoRA weights", output_dir / LORA_WEIGHTS, output_dir, err) from err
        raise save_failed("the final pipeline into", output_dir, output_dir, err,
                          left="its files there are incomplete until it is written again") from err


def _save_final(output_dir: Path, denoiser, text_encoder, cfg: TrainConfig, family) -> Path:
    if cfg.use_lora:
        tmp = output_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(tmp, denoiser, text_encoder, cfg, family)
        publish(tmp / LORA_WEIGHTS, output_dir / LORA_WEIGHTS)
        tmp.rmdir()
        return output_dir / LORA_WEIGHTS
    trained = {family.DENOISER: denoiser}
    if cfg.train_text_encoder:
        trained.update(zip(family.TRAINED_TEXT_ENCODERS, as_tuple(text_encoder)))
    if cfg.vae_model:  # the VAE trained with goes with the weights
        trained["vae"] = families.load_vae(cfg.vae_model)
    if cfg.save_precision == "fp32":
        # Untrained parts are re-read in fp32 rather than copied from the (maybe fp16) live ones.
        pipe = family.PIPELINE.from_pretrained(cfg.pretrained_model, revision=cfg.revision, **trained)
    else:  # every part read straight in the saved dtype (no fp32 copy); trained weights cast into it, tensor by tensor
        dtype = torch_dtype(cfg.save_precision)
        pipe = family.PIPELINE.from_pretrained(cfg.pretrained_model, revision=cfg.revision, dtype=dtype)
        for name, module in trained.items():
            getattr(pipe, name).load_state_dict({k: v.to("cpu", dtype) for k, v in module.state_dict().items()})
    pipe.save_pretrained(output_dir, safe_serialization=True)
    for name in [*pipe.components, "model_index.json"]:  # what save_pretrained wrote (not checkpoints, grids)
        if (output_dir / name).exists():
            follow_umask(output_dir / name)
        if (output_dir / name).is_dir():
            fsync_tree(output_dir / name)
        elif (output_dir / name).is_file():
            fsync(output_dir / name)
    fsync(output_dir)
    return output_dir
