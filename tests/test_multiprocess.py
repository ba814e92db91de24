"""Two gloo processes under `accelerate launch` give one process's results (one launch, several checks).

The launch line is the one docs/scaling_out.md and `make train-2proc` give for CPUs:
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ...
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dreambooth_lib.checkpoint as CK
import dreambooth_lib.weights as W
from dreambooth_lib.config import TrainConfig
from dreambooth_lib import __main__ as cli
from dreambooth_lib import data, distributed, evaluate
from dreambooth_lib.tiny import save_tiny_clip, save_tiny_dino

sys.path.insert(0, str(Path(__file__).parent))
from multiprocess_worker import CLASS_ARGS, EVAL_ARGS, TRAIN_ARGS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tiny_model_dir, tmp_path_factory):
    """One 2-process launch of tests/multiprocess_worker.py; returns its folder and inputs."""
    from conftest import write_photos

    root = tmp_path_factory.mktemp("two")
    instance_dir = root / "instance"
    write_photos(instance_dir)
    dino, clip = str(save_tiny_dino(root / "dino")), str(save_tiny_clip(root / "clip"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "multiprocess_worker.py"),
           str(root), str(tiny_model_dir), str(instance_dir), dino, clip]
    started = time.time()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    print(f"2-process launch: {time.time() - started:.1f} s")
    calls = [json.loads((root / f"calls-rank{r}.json").read_text()) for r in (0, 1)]
    return dict(root=root, model=str(tiny_model_dir), instance_dir=str(instance_dir), dino=dino, clip=clip,
                calls=calls, stdout=run.stdout, stderr=run.stderr)


class one_thread:
    """The 1-process references run with the launched processes' thread count (float sums match)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def test_class_images_are_sharded_and_equal_one_process(launched, tmp_path):
    calls, root = launched["calls"], launched["root"]
    # Dealt out by index, no image twice: rank 0 makes 0, 2, 4 and rank 1 makes 1, 3.
    assert calls[0]["class_images"] == [[0, 2, 4]] and calls[1]["class_images"] == [[1, 3]]
    with one_thread():
        assert cli.main(["class-images", "--pretrained_model", launched["model"], "--instance_dir",
                         launched["instance_dir"], "--class_dir", str(tmp_path), "--output_dir", str(tmp_path / "x"),
                         *CLASS_ARGS]) == 0
    two = sorted(p.name for p in (root / "class").glob("*.png"))
    assert two == sorted(p.name for p in tmp_path.glob("*.png")) and len(two) == 5
    for name in two:
        assert (root / "class" / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert json.loads((root / "class" / "class_images_summary.json").read_text())["num_processes"] == 2


def test_resumed_two_process_run_equals_uninterrupted_one(launched):
    root = launched["root"]
    whole, cut = (json.loads((root / run / "summary.json").read_text()) for run in ("whole", "cut"))
    assert whole["num_processes"] == cut["num_processes"] == 2
    assert whole["effective_batch_size"] == 1 * 1 * 2 * 2  # batch x accumulation x processes x (instance + class)
    assert cut["resumed_from"].endswith("checkpoint-3") and cut["steps"] == 6
    assert [h["loss"] for h in cut["loss_history"]] == pytest.approx([h["loss"] for h in whole["loss_history"]], abs=1e-6)
    # Gradients are averaged across processes (DDP, text encoder included): the weights agree before every step.
    sums = [calls["param_sums"] for calls in launched["calls"]]
    assert len(sums[0]) == 6 + 3 + 3 and sums[0] == sums[1] and len(set(sums[0][:6])) == 6
    a, b = load_file(root / "whole" / W.LORA_WEIGHTS), load_file(root / "cut" / W.LORA_WEIGHTS)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    # Both processes' RNG states are in the checkpoint and differ (LoRA dropout draws differently on each),
    # so restoring rank 0's state on both could not have reproduced the run.
    state = json.loads((root / "whole" / "checkpoint-3" / CK.STATE_JSON).read_text())
    tensors = load_file(root / "whole" / "checkpoint-3" / CK.STATE_TENSORS)
    rng = CK.decode_state(state["rng"], tensors)
    assert state["num_processes"] == len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert "processes: 2 (MULTI_CPU" in launched["stdout"] and "x 2 processes" in launched["stdout"]
    # A checkpoint of 2 processes is refused by 1, before anything is loaded.
    with pytest.raises(data.InputError, match="written by a run of 2 process"):
        CK.resolve_resume(TrainConfig(resume=str(root / "whole" / "checkpoint-3")), num_processes=1)


def test_outputs_are_written_once_by_the_main_process(launched):
    calls, root = launched["calls"], launched["root"]
    assert calls[0]["save_checkpoint"] == [3, 6, 3, 6] and calls[0]["save_final"] == [str(root / "whole"), str(root / "cut")]
    assert calls[0]["save_results"] == [True]
    assert not {"save_checkpoint", "save_final", "save_results"} & set(calls[1])
    for run in ("whole", "cut"):
        assert sorted(p.name for p in (root / run).iterdir()) == ["checkpoint-3", "checkpoint-6", W.LORA_WEIGHTS,
                                                                  "summary.json"]
    assert launched["stdout"].count("summary: ") == 2  # whole + resumed: printed once per run, not once per process


def test_evaluation_is_sharded_and_equals_one_process(launched, tmp_path):
    calls = launched["calls"]
    rank0, rank1 = calls[0]["eval_prompts"], calls[1]["eval_prompts"]
    assert rank0 and rank1 and not set(rank0) & set(rank1) and len(rank0) + len(rank1) == 4  # 3 categories + class
    with one_thread():
        assert evaluate.main(["--model", launched["model"], "--lora", str(launched["root"] / "whole"), "--subject-dir",
                              launched["instance_dir"], "--dino", launched["dino"], "--clip", launched["clip"],
                              "--out", str(tmp_path), *EVAL_ARGS]) == 0
    two = json.loads((launched["root"] / "eval" / "results.json").read_text())
    one = json.loads((tmp_path / "results.json").read_text())
    assert two["rows"] == one["rows"] and two["prompts"] == one["prompts"]
    assert two["rows"]["overall"]["DINO"] is not None


def test_a_launch_that_runs_processes_alone_is_caught(monkeypatch):
    from accelerate import PartialState

    lines = []
    assert distributed.check_launch(lines.append).num_processes == 1 and lines == ["processes: 1 (NO, device cpu)"]
    # `accelerate launch --num_processes 2` through the simple launcher: one process, MASTER_ADDR set.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    distributed.check_launch(lines.append)
    assert "WARNING" in lines[1] and "started ONE" in lines[1] and "--multi_gpu" in lines[1]
    # torchrun started 2 processes but accelerate set up 1 in each (CPU without ACCELERATE_USE_CPU): refused.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(data.InputError, match="ACCELERATE_USE_CPU=true accelerate launch --multi_gpu"):
        distributed.check_launch(lines.append)
    assert PartialState().num_processes == 1


def test_training_state_holds_every_process_rng_and_reads_the_older_format(tmp_path):
    from safetensors.torch import save_file

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    saved = distributed.rng_state()
    try:
        states = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            states.append(distributed.rng_state())
        CK.save_training_state(tmp_path, 5, opt, sched, [], TrainConfig(), states)
        for rank in (0, 1):  # each process gets its own state back
            torch.manual_seed(99)
            assert CK.load_training_state(tmp_path, opt, sched, rank, num_processes=2)[0] == 5
            assert torch.equal(torch.get_rng_state(), states[rank]["torch"])
        with pytest.raises(data.InputError, match="written by a run of 2 process"):
            CK.load_training_state(tmp_path, opt, sched)
        # A checkpoint written before several processes were stored: flat keys, one process.
        state = json.loads((tmp_path / CK.STATE_JSON).read_text())
        del state["rng"], state["num_processes"]
        state |= dict(rng_python=states[1]["python"], rng_numpy=states[1]["numpy"])
        tensors = {k: v for k, v in load_file(tmp_path / CK.STATE_TENSORS).items() if not k.startswith("rng.")}
        save_file(tensors | {"rng.torch": states[1]["torch"]}, tmp_path / CK.STATE_TENSORS)
        (tmp_path / CK.STATE_JSON).write_text(json.dumps(state))
        torch.manual_seed(99)
        assert CK.checkpoint_processes(tmp_path) == 1 and CK.load_training_state(tmp_path, opt, sched)[0] == 5
        assert torch.equal(torch.get_rng_state(), states[1]["torch"])
    finally:
        distributed.set_rng_state(saved)
