"""optimizer="adamw8bit-torchao": torchao's 8-bit AdamW through checkpoints and resume.

torchao is not a dependency: `make install` puts it in .venv/extras/torchao and `make unit` adds that to
PYTHONPATH (in the venv itself diffusers and transformers would import it in every run). A bare
`pytest tests` without it reports these tests as skipped, with this reason."""
from __future__ import annotations

import json

import pytest
import torch

import dreambooth_lib.checkpoint as CK
import dreambooth_lib.models as M
import dreambooth_lib.train as T
from dreambooth_lib import data
from dreambooth_lib.config import TrainConfig
from test_train import make_cfg, unet_weights

pytest.importorskip("torchao", reason="torchao is installed by `make install` in .venv/extras/torchao; "
                                      "run with PYTHONPATH=.venv/extras/torchao (as `make unit` does)")


def test_torchao_8bit_states_survive_a_checkpoint(tmp_path, monkeypatch):
    # torchao's AdamW8bit keeps a state of >= 4,096 elements as an OptimState8bit tensor subclass (codes, block
    # scales, quantisation map): it goes through save/load_training_state, and the resumed optimizer steps
    # exactly as the uninterrupted one. (Before, the first checkpoint of an optimizer="adamw8bit-torchao" run
    # crashed.) torchao compiles its step per parameter shape (~30 s on this CPU): here it runs eagerly.
    from diffusers.optimization import get_scheduler
    from torchao.optim.subclass_8bit import OptimState8bit

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)

    torch.manual_seed(0)
    x = torch.randn(8, 128)
    whole = torch.nn.Linear(128, 64, bias=False)  # 8,192 elements: 8-bit states

    def make(model):
        opt = M.make_optimizer([{"params": list(model.parameters()), "lr": 1e-2}], TrainConfig(optimizer="adamw8bit-torchao"))
        return opt, get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=10)

    def step(model, opt, sched):
        model(x).square().mean().backward()
        opt.step(), sched.step(), opt.zero_grad()

    opt, sched = make(whole)
    for _ in range(2):
        step(whole, opt, sched)
    assert type(opt.state[whole.weight]["exp_avg"]) is OptimState8bit
    CK.save_training_state(tmp_path, 2, opt, sched, [], TrainConfig())
    resumed = torch.nn.Linear(128, 64, bias=False)
    resumed.load_state_dict(whole.state_dict())
    opt_r, sched_r = make(resumed)
    assert CK.load_training_state(tmp_path, opt_r, sched_r) == (2, [])
    assert type(opt_r.state[resumed.weight]["exp_avg"]) is OptimState8bit
    for _ in range(2):
        step(whole, opt, sched), step(resumed, opt_r, sched_r)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # A file can only name the known optimizer-state classes: nothing else is imported on load.
    state = json.loads((tmp_path / CK.STATE_JSON).read_text())
    (tmp_path / CK.STATE_JSON).write_text(json.dumps(state).replace("torchao.optim.subclass_8bit.OptimState8bit", "os.system"))
    with pytest.raises(data.InputError, match="unknown tensor class 'os.system'"):
        CK.load_training_state(tmp_path, *make(torch.nn.Linear(128, 64, bias=False)))


def test_torchao_run_resumes_like_an_uninterrupted_one(tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    # The whole loop with torchao's optimizer (eager, as above): it keeps lr as a tensor, which reached the
    # JSON history and crashed the first checkpoint; the full UNet has 8-bit (subclass) states.
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    common = dict(optimizer="adamw8bit-torchao", max_train_steps=3, checkpointing_steps=2, lr_scheduler="linear")
    whole = T.train(make_cfg(tiny_model_dir, instance_dir, tmp_path / "whole", **common), progress=False)
    resumed = T.train(make_cfg(tiny_model_dir, instance_dir, tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"),
                               **common), progress=False)
    assert whole["optimizer"] == "torchao.optim.adam.AdamW8bit" and resumed["resumed_from"].endswith("checkpoint-2")
    assert [h["loss"] for h in resumed["loss_history"]] == [h["loss"] for h in whole["loss_history"]]
    a, b = unet_weights(tmp_path / "whole"), unet_weights(tmp_path / "resumed")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)
