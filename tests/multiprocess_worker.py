"""Run by tests/test_multiprocess.py under `accelerate launch --num_processes 2` (one launch, several checks).

    python tests/multiprocess_worker.py ROOT MODEL INSTANCE_DIR DINO CLIP

Each process runs the CLI as a user would: class-images, train (uninterrupted), train killed after
checkpoint-3 (both processes, during step 4) then resumed, evaluate. Every process records which class
images it generated, its trained weights' sum before each step, which evaluation prompts it rendered
and what it saved, in ROOT/calls-rank<r>.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import dreambooth_lib.class_images as CI
import dreambooth_lib.step as S
import dreambooth_lib.train as T
from dreambooth_lib import __main__ as cli
from dreambooth_lib import distributed, evaluate

# The settings both the 2-process run and the test's 1-process reference use.
CLASS_ARGS = ["--resolution", "32", "--class_noun", "dog", "--identifier", "sks", "--num_class_images", "5",
              "--class_inference_steps", "2"]
TRAIN_ARGS = CLASS_ARGS + ["--use_lora", "--train_text_encoder", "--lora_dropout", "0.1", "--learning_rate", "1e-3",
                           "--lr_scheduler", "linear", "--max_train_steps", "6", "--checkpointing_steps", "3",
                           "--validation_steps", "0", "--no-cache_latents"]
EVAL_ARGS = ["--class-noun", "dog", "--identifier", "sks", "--live", "--smoke"]


def record(calls: dict, key: str, fn, describe):
    def wrapped(*args, **kw):
        calls.setdefault(key, []).append(describe(*args, **kw))
        return fn(*args, **kw)
    return wrapped


def main(root: Path, model: str, instance_dir: str, dino: str, clip: str) -> None:
    rank = distributed.process_state().process_index
    calls: dict[str, list] = {}
    T.save_checkpoint = record(calls, "save_checkpoint", T.save_checkpoint, lambda out, step, *a, **k: step)
    T.save_final = record(calls, "save_final", T.save_final, lambda out, *a, **k: str(out))
    CI._generate = record(calls, "class_images", CI._generate, lambda indices, *a, **k: list(indices))
    evaluate.generate = record(calls, "eval_prompts", evaluate.generate, lambda pipe, prompt, *a, **k: prompt)
    evaluate.save_results = record(calls, "save_results", evaluate.save_results, lambda *a, **k: True)
    started = time.time()

    def lap(what):
        if rank == 0:
            print(f"worker: {what} done at {time.time() - started:.1f} s", flush=True)

    real_step = S.train_step
    kill_at = []  # a step index: both processes die there (as if killed after the checkpoint before it)

    def train_step(state, step):
        if step in kill_at:
            raise KeyboardInterrupt
        calls.setdefault("param_sums", []).append(sum(p.detach().double().sum().item() for p in state.params))
        return real_step(state, step)

    T.train_step = train_step
    common = ["--pretrained_model", model, "--instance_dir", instance_dir, "--class_dir", str(root / "class")]

    assert cli.main(["class-images", *common, *CLASS_ARGS, "--output_dir", str(root / "unused")]) == 0
    lap("class-images")
    assert cli.main(["train", *common, *TRAIN_ARGS, "--output_dir", str(root / "whole")]) == 0
    lap("train")

    kill_at.append(3)  # in step 4, after checkpoint-3 was written
    try:
        cli.main(["train", *common, *TRAIN_ARGS, "--output_dir", str(root / "cut")])
        raise AssertionError("the cut run was not interrupted")
    except KeyboardInterrupt:
        pass
    kill_at.clear()
    lap("train, killed")
    assert cli.main(["train", *common, *TRAIN_ARGS, "--output_dir", str(root / "cut"), "--resume", "latest"]) == 0
    lap("train, resumed")

    assert evaluate.main(["--model", model, "--lora", str(root / "whole"), "--subject-dir", instance_dir,
                          "--dino", dino, "--clip", clip, "--out", str(root / "eval"), *EVAL_ARGS]) == 0
    lap("evaluate")
    (root / f"calls-rank{rank}.json").write_text(json.dumps(calls))
    distributed.process_state().wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
