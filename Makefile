# Two commands do all the set-up on a fresh machine:
#   make demo   - virtualenv + install + the toy-world DreamBooth demo end to end (CPU, minutes)
#   make test   - virtualenv + install + the test suite (and the notebooks, headless, smoke size)
# Both write only under runs/ (git-ignored): the README's committed figures in images/ change only
# by `make figures` (demo + full notebook run) and `make ablations`.
# torch is installed first and only when the venv has none: torch==2.13.0 is a CPU wheel on our
# machines; elsewhere pass e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
# Colab never runs this file: the notebooks' install cell uses requirements.txt, which has no torch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# torchao only for the tests of optimizer="adamw8bit-torchao", in a folder of its own (on PYTHONPATH in `make
# unit`): installed in the venv, diffusers and transformers would import it, with warnings, in every demo run.
TORCHAO_SITE := $(VENV)/extras/torchao
export OMP_NUM_THREADS ?= 2
# The tests and the notebooks' smoke runs: one thread. Their tiny models' ops are too small to split, and on a
# busy 2-core machine a second OpenMP thread mostly waits for a core (measured side by side: notebook 05's smoke
# run 164 s at 2 threads, 17 s at 1; the resume and compiled-step tests of test_train.py 70 s vs 24 s).
TEST_THREADS ?= 1
# pytest-xdist workers, one per core; whole test files go to one worker (--dist loadfile) so module fixtures are
# built once. Measured one after the other on the quiet 2-core CPU (2026-12-02): 326 tests in 406 s serial, 238 s with 2.
TEST_WORKERS ?= 2
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo demo-flow toy-bench figures test unit notebooks notebooks-flux ablations pretrain pretrain-flow bench train-2proc clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --upgrade --target $(TORCHAO_SITE) "torchao==0.18.0"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

demo: install
	$(PY) -m dreambooth_lib.toyworld demo  # figures + metrics in runs/toy_demo/

# Refresh the README's figures in images/: the demo's, then the notebooks' from a full (non-smoke)
# run, which writes them to runs/images/ (2-core CPU: the demo ~2 min, the notebooks ~5 min).
figures: install
	$(PY) -m dreambooth_lib.toyworld demo --images_dir images
	$(PY) .ci/run_notebooks.py
	cp runs/images/*.png images/

test: unit notebooks

unit: install
	OMP_NUM_THREADS=$(TEST_THREADS) PYTHONPATH=$(TORCHAO_SITE) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

notebooks: install
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) .ci/run_notebooks.py --smoke
	# the parameters a user changes by hand (non-zero rank / lr replace the model's recipe)
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) .ci/run_notebooks.py --smoke -p LORA_RANK=8 -p LEARNING_RATE=0.002 02_train

# The five notebooks with MODEL = a tiny random FLUX.1 pipeline (issue 18): not part of `make test`, it costs
# ~45 s more on the quiet 2-core CPU (the notebooks sample at the run's 32 px)
notebooks-flux: install
	$(PY) -c "from dreambooth_lib.tiny import save_tiny_flux_pipeline as s; s('runs/tiny_flux')"
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) .ci/run_notebooks.py --smoke -p MODEL='"$(CURDIR)/runs/tiny_flux"' -p RESOLUTION=32

# DreamBooth on the toy flow model (FLUX.2 [klein] architecture, data/toy_flow_model), measured by the same oracle
demo-flow: install
	OMP_NUM_THREADS=1 $(PY) -m dreambooth_lib.toyworld demo --model data/toy_flow_model --output_dir runs/toy_demo_flow

# The toy DreamBench (docs/toy_world.md): 8 subjects x seeds 0 1 2 x 6 recipes, resumable; the README's table
# came from two such processes side by side (subjects split by class), then --report_only
toy-bench: install
	OMP_NUM_THREADS=1 $(PY) -m dreambooth_lib.toyworld bench --images_dir images

ablations: install
	$(PY) -m dreambooth_lib.toyworld ablate --images_dir images

# data/toy_model in two cycles (81 min on the 2-core CPU): 7,000 steps from scratch, then 3,400 more
pretrain: install
	$(PY) -m dreambooth_lib.toyworld pretrain --out runs/toy_model_cycle1
	$(PY) -m dreambooth_lib.toyworld pretrain --init runs/toy_model_cycle1 --seed 1 --steps 3400 --learning_rate 1.5e-4

# Several processes on a CPU (docs/scaling_out.md): the demo's fine-tune (4 instance + 4 class pictures
# per step) as 2 gloo processes of 2 + 2 each. `accelerate launch --cpu --num_processes 2` would start ONE
# process (accelerate's simple launcher; several CPU processes need MPI there); `--multi_gpu` starts them
# with torchrun, and ACCELERATE_USE_CPU=true makes them gloo CPU processes. Extra flags: ARGS="--max_train_steps 20".
train-2proc: install
	ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 $(VENV)/bin/accelerate launch --multi_gpu --num_processes 2 \
	  --num_machines 1 --mixed_precision no --dynamo_backend no -m dreambooth_lib train \
	  --instance_dir data/subjects/marked_star --class_noun star --resolution 32 --num_class_images 100 \
	  --class_batch_size 50 --class_inference_steps 25 --class_guidance_scale 7 --max_train_steps 400 \
	  --learning_rate 1e-4 --train_text_encoder --text_encoder_lr 3e-5 --train_batch_size 2 \
	  --checkpointing_steps 200 --validation_steps 0 --output_dir runs/two_processes $(ARGS)

# data/toy_flow_model: the transformer + Qwen3 from scratch on the toy SD model's VAE, then two cycles on freshly
# rendered sets (docs/toy_world.md; ~3 h at one thread: on a busy 2-core machine two OpenMP threads made its steps
# 20x slower). Each cycle writes images/toy_flow_pretrain_loss.png with the earlier cycles' curves.
pretrain-flow: install
	OMP_NUM_THREADS=1 $(PY) -m dreambooth_lib.toyworld pretrain-flow --seed 0 --steps 3000 --out runs/toy_flow_cycle1
	OMP_NUM_THREADS=1 $(PY) -m dreambooth_lib.toyworld pretrain-flow --init runs/toy_flow_cycle1 --seed 2 --steps 2000 \
	  --learning_rate 1e-3 --out runs/toy_flow_cycle2
	OMP_NUM_THREADS=1 $(PY) -m dreambooth_lib.toyworld pretrain-flow --init runs/toy_flow_cycle2 --seed 3 --steps 1600 \
	  --learning_rate 1e-3 --out data/toy_flow_model

bench: install
	$(PY) benchmarks/bench_train.py --smoke
	$(PY) benchmarks/bench_generate.py --smoke

clean:
	rm -rf $(VENV) runs outputs
