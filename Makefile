# The README's commands. `make demo` and `make test` set everything up first (idempotent, fast the second time).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rvla_peft-setup
# CPU-only machines take the CPU build of torch (a multi-GB CUDA build otherwise); where a GPU driver answers,
# the default CUDA build.
TORCH_SPEC ?= $(shell nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --no-input

.PHONY: setup demo test test-slow test-all lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile rvla_peft/renderer.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[sim,quant,dev]" "$(TORCH_SPEC)"
	$(PY) -m rvla_peft.renderer install
	$(PY) -m rvla_peft.renderer check
	@touch $@

# The demo: robust LoRA post-training of the shipped pretrained base (builtin:tiny-vla-maniskill) on PushCube, then
# the base ("before"), the adapter just trained ("trained": recipes/tiny_demo.yaml, 20 updates under colour jitter
# distilling the base's clean-frame actions, a few minutes) and the adapter shipped in the package ("color",
# builtin:tiny-vla-maniskill-color: PPO with the invariance penalty, 60 updates) evaluated on the same episodes,
# clean and perturbed: outputs/tiny_demo/report/report.md. Reset seeds 2000 onwards: episodes no study or choice of
# recipe here has seen (the demo's recipe was checked on seeds 7000-7049). 50 episodes per cell, 10 async envs
# that each start their next episode as soon as one ends (a batched action costs about the same for 2 and for 10
# envs, and async envs render on the second core; bench/bench_eval.py). --video 2: the first 2 episodes of each
# setting played again with the three policies side by side, report/videos/SETTING.mp4 and .gif.
DEMO_EVAL ?= --suite none --perturb color_jitter@0.5 --perturb shift@0.5 --perturb rotation@0.5 --episodes 50 \
	--seed 2000 --num-envs 10 --schedule stream --video 2 env.vectorization=async
# Training: one torch thread while acting, since OpenMP workers spinning beside the in-process simulator and software
# renderer took their cores (updates went 5-10x slower whenever anything else used the other core); the updates,
# which have the machine to themselves, take every core (update_threads): 6.0 -> 3.3 s each on 2 cores. The
# evaluation's envs step in worker processes that wait while the policy acts, so it acts on every core: 63 -> 44 ms
# per action of 10 envs, the same episodes.
DEMO_THREADS ?= $(shell nproc)
demo: export OMP_NUM_THREADS ?= 1
demo: setup
	$(PY) -m rvla_peft.train recipes/tiny_demo.yaml overwrite_output_dir=true update_threads=$(DEMO_THREADS) $(ARGS)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m rvla_peft.eval --adapter trained=outputs/tiny_demo/adapter \
		--adapter color=builtin:tiny-vla-maniskill-color $(DEMO_EVAL) --out outputs/tiny_demo/report --overwrite

# One pytest-xdist worker per core (at most 4: each holds torch, transformers and ManiSkill); worksteal evens out
# the few minute-long tests. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

test-all: setup
	$(PY) -m pytest -q -m "" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) bench/bench_iteration.py
	$(PY) bench/bench_env.py
	$(PY) bench/bench_env_startup.py
	$(PY) bench/bench_eval.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
