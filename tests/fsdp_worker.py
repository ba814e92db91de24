"""Run by tests/test_fsdp.py under `accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes 2`
on gloo CPU processes (ACCELERATE_USE_CPU=true): a full fine-tune of the tiny FLUX.1 with its transformer sharded.

    python tests/fsdp_worker.py ROOT FLUX_MODEL INSTANCE_DIR FLUX2_MODEL

accelerate 1.15 sets up FSDP for GPU processes only: CPU processes stay MULTI_CPU (AcceleratorState makes FSDP
only of the GPU-like distributed types), and train() refuses that launch; the refusal is recorded first. torch's
FSDP2 itself runs on gloo, so the worker then marks accelerate's process state FSDP, with the plugin accelerate
builds from the launch config's environment (the only thing it changes; on GPUs accelerate does this itself),
and trains as a user would: a whole run (checkpoints at steps 2 and 4, a validation grid at 4), then a run
resumed from checkpoint-2. Each process records, in ROOT/fsdp-rank<r>.json, the refusal, the FSDP units of
the prepared transformer, its share of the weights, the plugin's settings and the block classes the
config's wrap policy picks in a FLUX.2 [klein] transformer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from diffusers import Flux2Transformer2DModel
from torch.distributed.fsdp import FSDPModule

import dreambooth_lib.train as T
from dreambooth_lib import distributed
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import InputError

# The settings both the 2-process run and the test's 1-process reference use (the reference accumulates 2
# micro-batches where each process here takes 1: the same items and draws per optimizer step).
SETTINGS = dict(class_noun="dog", identifier="sks", resolution=32, with_prior_preservation=False, max_train_steps=4,
                learning_rate=1e-3, lr_scheduler="linear", optimizer="adamw", max_grad_norm=0.05,
                max_sequence_length=16, checkpointing_steps=2, validation_steps=0)


def main(root: Path, model: str, instance_dir: str, flux2: str) -> None:
    rank = distributed.process_state().process_index  # reads ACCELERATE_USE_CPU: 2 gloo processes
    calls: dict = {}

    def cfg(out: str, **kw) -> TrainConfig:
        return TrainConfig(**{**SETTINGS, "pretrained_model": model, "instance_dir": instance_dir,
                              "output_dir": str(root / out), **kw})

    try:
        T.train(cfg("refused"), progress=False, log=lambda *_: None)
    except InputError as err:
        calls["refused"] = str(err)

    real_make, real_prepare = T.make_accelerator, T.prepare_training

    def make_accelerator(config):
        accelerator = real_make(config)
        PartialState().distributed_type = AcceleratorState().distributed_type = DistributedType.FSDP
        AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
        return accelerator

    def prepare_training(*args, **kw):
        state = real_prepare(*args, **kw)
        transformer = state.trained[0]
        calls.setdefault("units", []).append(sorted(type(m).__name__ for m in transformer.modules()
                                                    if isinstance(m, FSDPModule)))
        calls.setdefault("share", []).append([sum(p.to_local().numel() for p in transformer.parameters()),
                                              sum(p.numel() for p in transformer.parameters())])
        return state

    T.make_accelerator, T.prepare_training = make_accelerator, prepare_training
    T.train(cfg("whole", gradient_checkpointing=True, validation_steps=4, num_validation_images=1,
                validation_inference_steps=1), progress=False)
    T.train(cfg("resumed", gradient_checkpointing=True, resume=str(root / "whole" / "checkpoint-2")), progress=False)

    plugin = AcceleratorState().fsdp_plugin
    calls["plugin"] = dict(version=plugin.fsdp_version, reshard=plugin.reshard_after_forward,
                           state_dict_type=plugin.state_dict_type.name, wrap=plugin.auto_wrap_policy.func.__name__,
                           names=plugin.transformer_cls_names_to_wrap)
    klein = Flux2Transformer2DModel.from_pretrained(flux2, subfolder="transformer")
    wraps = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), klein)
    calls["flux2_units"] = sorted(type(m).__name__ for m in klein.modules() if wraps(m))
    (root / f"fsdp-rank{rank}.json").write_text(json.dumps(calls))
    PartialState().wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
