"""Several processes, one result: what `accelerate launch --num_processes N` changes.

accelerate runs one copy of the program per process (one per GPU; gloo processes on a CPU). Every copy
loads the models and runs the same code; what differs per process is which items it works on:
class images (class_images.ensure_class_images: image i by index, each with its own seed), training batches
(step.batch_indices: one data stream dealt to the processes; DDP averages the gradients) and the
evaluation prompts (evaluate.evaluate_run). The main process alone writes checkpoints, weights and
tables. This module holds the small pieces that are about processes rather than DreamBooth: checking
that the launch gave the processes that were asked for, every process's RNG state for an exact resume,
dealing out / gathering work, and FSDP (a full fine-tune's denoiser sharded by accelerate: its whole
weights and optimizer state gathered to the main process for checkpoints, scattered back on resume).
"""

from __future__ import annotations

import os
import random
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator, PartialState, init_empty_weights
from accelerate.utils import DistributedType, gather_object, parse_flag_from_env

from .errors import InputError

CPU_LAUNCH = "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m dreambooth_lib train ..."
FSDP_LAUNCH = "accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes N -m dreambooth_lib train ..."


def process_state() -> PartialState:
    """accelerate's process state (rank, number of processes, device), shared by the whole program.

    Accelerator() reads ACCELERATE_USE_CPU (gloo processes on CPUs); PartialState() alone does not, so code
    that runs before any Accelerator (class-images, evaluate) would see one process per copy without this.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def check_launch(log: Callable[[str], None] = print) -> PartialState:
    """Log how many processes this run got; stop a launch where each process would run alone.

    torchrun (what `accelerate launch --multi_gpu` calls) sets WORLD_SIZE=N in every process it starts;
    if accelerate then sets up a single process (no GPU visible, ACCELERATE_USE_CPU unset), N copies would
    each train alone and overwrite each other's files: refused. accelerate's simple launcher (chosen for
    `--cpu`, or for `--num_processes N` without `--multi_gpu` on a machine with < 2 GPUs) starts ONE
    process and sets MASTER_ADDR only when N > 1 was asked for: a loud warning, since the run is correct,
    just N times slower than intended.
    """
    state = process_state()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes == 1 and world > 1:
        raise InputError(
            f"this process is one of WORLD_SIZE={world} started by the launcher, but accelerate set up a single "
            "process (no GPU visible and ACCELERATE_USE_CPU unset), so each would train alone and write the same "
            f"files. On CPUs launch with: {CPU_LAUNCH}; on GPUs check that every process sees its GPU (nvidia-smi)")
    if state.num_processes == 1 and "MASTER_ADDR" in os.environ and "ACCELERATE_MIXED_PRECISION" in os.environ:
        log("WARNING: `accelerate launch` was asked for several processes but started ONE (its simple launcher: "
            "`--cpu`, or no `--multi_gpu` with fewer than 2 GPUs). Running on 1 process. For N CPU processes: "
            f"{CPU_LAUNCH}")
    log(f"processes: {state.num_processes} ({state.distributed_type.value}, device {state.device})")
    return state


def rng_state() -> dict:
    """This process's global RNG states (python, numpy, torch CPU, CUDA): what LoRA dropout draws from."""
    np_state = np.random.get_state()
    return dict(python=list(random.getstate()), numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]],
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every process's rng_state(), in rank order, on every process (a collective: all must call it)."""
    return gather_object([rng_state()])


def my_share(items: list) -> list[tuple[int, object]]:
    """(index, item) pairs this process works on: items dealt round-robin by rank."""
    state = process_state()
    return list(enumerate(items))[state.process_index::state.num_processes]


def gather_results(done: list[tuple[int, object]], n: int) -> list:
    """Inverse of my_share: every process's (index, result) pairs -> the n results in index order, everywhere."""
    by_index = dict(gather_object(done))
    if sorted(by_index) != list(range(n)):
        raise RuntimeError(f"gathered results for indices {sorted(by_index)}, expected 0..{n - 1}")
    return [by_index[i] for i in range(n)]


# --- FSDP: the denoiser of a full fine-tune sharded across processes ---------------------------------------

def sharding_requested() -> str | None:
    """"fsdp" / "deepspeed" when `accelerate launch` was given such a config (it sets ACCELERATE_USE_FSDP /
    ACCELERATE_USE_DEEPSPEED in every process it starts), else None. Model-free: validate.py asks it."""
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "fsdp" if parse_flag_from_env("ACCELERATE_USE_FSDP") else None


def check_sharding(accelerator: Accelerator, log: Callable[[str], None] = print) -> bool:
    """Whether this run shards the denoiser with FSDP2; refuses an FSDP launch that accelerate did not set up
    as FSDP2. accelerate 1.15 makes FSDP of GPU processes only: with ACCELERATE_USE_CPU its processes stay
    MULTI_CPU (plain data parallel, every process holding the whole model), which would pass silently."""
    if sharding_requested() != "fsdp":
        return False
    if accelerator.distributed_type != DistributedType.FSDP:
        raise InputError(
            f"the launch asks for FSDP (ACCELERATE_USE_FSDP) but accelerate set up {accelerator.distributed_type.value}: "
            "accelerate shards models on GPU processes only (not ACCELERATE_USE_CPU ones), so every process would hold "
            f"the whole model. Launch on GPUs: {FSDP_LAUNCH}")
    if not accelerator.is_fsdp2:
        raise InputError("the launch config asks for FSDP version 1; checkpoints here gather FSDP2's sharded state: "
                         "set fsdp_version: 2 (configs/accelerate_fsdp.yaml)")
    log(f"FSDP2: the denoiser's weights, gradients and optimizer states sharded over {accelerator.num_processes} "
        "processes; checkpoints gather them to the main process")
    return True


def unsharded_copy(accelerator: Accelerator, module: torch.nn.Module) -> torch.nn.Module | None:
    """A diffusers model with the whole weights of FSDP-sharded `module`, on the main process (None on the
    others). A collective: every process calls it (accelerate's get_state_dict gathers the shards to the main
    process, in CPU memory). The copy is built on the meta device and takes the gathered tensors as they are."""
    state = accelerator.get_state_dict(module)
    if not accelerator.is_main_process:
        return None
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclassed it
    with init_empty_weights():
        copy = cls.from_config(module.config)
    copy.load_state_dict(state, assign=True)
    return copy.train(module.training)


def full_optimizer_state(module: torch.nn.Module, optimizer) -> dict:
    """The optimizer state of FSDP-sharded `module`, whole, keyed by parameter names, on the main process ({} on
    the others); a collective. torch's distributed-checkpoint state_dict helpers gather it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def set_full_optimizer_state(module: torch.nn.Module, optimizer, state: dict) -> None:
    """Inverse of full_optimizer_state: the main process's whole state ({} elsewhere) sent to every process,
    each keeping its shard; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, getattr(optimizer, "optimizer", optimizer), state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
