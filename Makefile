# vgen developer entry points. `make demo` and `make test` are the two set-up commands.
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PIP = $(VENV)/bin/pip
PY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint bench demo demo-data clean cluster-up cluster-down cluster-smoke test-slurm

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install $(TORCH_SPEC) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/unet_step.py

DEMO_ARGS ?=  # extra Hydra overrides for the demo run, e.g. DEMO_ARGS="trainer.max_steps=50"
DEMO_PROMPTS = "a red circle moving left" "a green square moving right" "a blue triangle moving down" "a yellow circle moving left"

demo-data: setup
	$(PY) data_pipelines/synthetic.py --out data/demo --paths fixed

# Set up, write the demo shards, train the demo experiment on CPU (resuming if interrupted), sample videos.
demo: demo-data
	WANDB_MODE=offline $(PY) -m vgen.train experiment=demo resume=auto $(DEMO_ARGS)
	@ckpt=$$(ls outputs/demo/checkpoints/step*.ckpt | sort | tail -n 1); i=0; \
	for prompt in $(DEMO_PROMPTS); do i=$$((i+1)); \
	  $(PY) -m vgen.sample checkpoint=$$ckpt prompt="$$prompt" seed=$$i upscale=8 out=outputs/demo/videos/sample_$$i.mp4 \
	    || exit 1; echo "  $$prompt -> outputs/demo/videos/sample_$$i.mp4"; done; \
	echo "checkpoint: $$ckpt"; echo "videos: outputs/demo/videos/"; \
	echo "W&B offline run: $$(ls -d outputs/demo/wandb/offline-run-* | tail -n 1) (wandb sync <dir> to upload)"

# A real single-host SLURM cluster with 2 emulated nodes (root, Debian 12; installs slurm + munge with apt).
cluster-up:
	bash launch/local_cluster/up.sh

cluster-down:
	bash launch/local_cluster/down.sh

cluster-smoke:
	bash launch/local_cluster/smoke.sh

# The SLURM tests alone (they skip, saying why, when no cluster answers): make cluster-up test-slurm
test-slurm: setup
	$(PY) -m pytest tests/test_slurm.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
