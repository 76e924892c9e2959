# syntax=docker/dockerfile:1
#
# One image, two roles (docker/entrypoint.sh picks):
#   docker run IMAGE              -> serve: the inference API (hf-serve) on $HF_SERVE_PORT
#   docker run IMAGE train ARGS   -> accelerate launch training/finetune.py ARGS
#   docker run IMAGE CMD ...      -> anything else is exec'd as is (bash, python, nvidia-smi, ...)
#
# Models are never baked in: mount a folder of model folders at /app/models (and, for training,
# the run folders with their checkpoints at /app/runs).
# The Hugging Face cache (HF_HOME) lives at /hf-cache: mount a volume there.
#
# Single stage on purpose: every dependency installs from a wheel (no compilers), so a
# builder stage would copy the very same site-packages and save nothing.

# CUDA-enabled PyTorch (conda Python 3.11, torch 2.9.0 for CUDA 12.8, cuDNN 9): the default build,
# the GPU image. Pinned; to change it pass --build-arg BASE_IMAGE=... (a Python >= 3.11 image with
# `python` and `pip` on PATH, and torch >= 2.6 installed, or TORCH_SPEC below).
# The CPU variant (`make image-cpu`) differs in these two arguments only: a plain Debian Python base
# (python:3.11-slim, or the local one docker/build-cpu-image.sh makes) and the CPU torch build.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# The torch build to install on a base that has none: empty (the default) keeps the base image's
# torch. A requirement, e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu", or a
# wheel file in a folder mounted at build time (podman build -v ./wheels:/wheels:ro ...).
ARG TORCH_SPEC=

# The container user; build with APP_UID=$(id -u) APP_GID=$(id -g) so that a bind-mounted
# ./models stays writable by you and by the train service.
ARG APP_UID=1000
ARG APP_GID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DL3064 flags names containing "TOKEN": here that is TOKENIZERS_PARALLELISM, not a secret.
# Secrets (HF_TOKEN, HF_SERVE_API_KEY) are only ever passed at run time, never baked in.
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/app \
    APP_HOME=/app \
    HF_HOME=/hf-cache \
    HF_HUB_OFFLINE=0 \
    HF_DATASETS_OFFLINE=0 \
    TOKENIZERS_PARALLELISM=false \
    HF_SERVE_MODELS_DIR=/app/models \
    HF_SERVE_HOST=0.0.0.0 \
    HF_SERVE_PORT=8000

WORKDIR /app

# 0) torch, when the base image has none (the CPU variant). Its own layer: the largest, and it
#    changes only with TORCH_SPEC. Word splitting is wanted: TORCH_SPEC may carry pip options;
#    and TORCH_SPEC is the pin (a version or one wheel file), which a linter cannot see through.
# hadolint ignore=DL3013,SC2086
RUN if [ -n "${TORCH_SPEC}" ]; then pip install --no-cache-dir ${TORCH_SPEC}; fi \
 && python -c "import torch; print('torch', torch.__version__)"

# 1) Dependencies only, in their own layer: it is rebuilt when pyproject.toml changes, not when
#    the source does. torch is pinned (pip constraint) to the build the base image ships, so
#    pip can never swap the CUDA torch for another one: if a dependency needed a different
#    torch, the build fails here instead of silently downloading gigabytes.
# Declared here, not at the top: a build argument invalidates the cache of every RUN after it,
# and the torch layer above should not be rebuilt for it.
# Optional features of pyproject.toml installed with the project (comma-separated extras; empty for
# none): `onnx` is what HF_SERVE_BACKEND=onnx needs (onnx, onnxscript, onnxruntime: about 60 MB).
ARG EXTRAS=onnx
COPY pyproject.toml ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /tmp/constraints.txt \
 && python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = [e for e in sys.argv[1].split(',') if e]; print('\n'.join(p['dependencies'] + [r for e in extras for r in p['optional-dependencies'][e]]))" "${EXTRAS}" \
      > /tmp/requirements.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements.txt \
 && python -c "import importlib.metadata as m, sys; pin = open('/tmp/constraints.txt').read().strip(); sys.exit(0 if pin == 'torch==' + m.version('torch') else 'pip replaced torch: ' + pin)" \
 && rm -f /tmp/requirements.txt

# 2) The source, then the project itself without dependencies (they are all in place).
COPY . .
RUN pip install --no-cache-dir --no-deps -c /tmp/constraints.txt . \
 && rm -rf build ./*.egg-info /tmp/constraints.txt \
 && python -c "import accelerate, fastapi, transformers; from transformers.utils import is_torch_available; assert is_torch_available(), 'transformers cannot use this torch'" \
 && command -v hf-serve accelerate \
 && chmod 0755 docker/entrypoint.sh

# 3) Non-root user. The mount points exist in the image and belong to it, so fresh named
#    volumes start out writable (Docker copies the ownership of the image's directory).
RUN groupadd --non-unique --gid "${APP_GID}" app \
 && useradd --non-unique --uid "${APP_UID}" --gid "${APP_GID}" --home-dir /home/app --create-home --shell /bin/bash app \
 && mkdir -p /app/models /app/runs /hf-cache \
 && chown "${APP_UID}:${APP_GID}" /app/models /app/runs /hf-cache
USER ${APP_UID}:${APP_GID}

EXPOSE 8000

# Liveness: GET /health on the local port (python + urllib: no curl in the image). The train
# role has no server: docker-compose.yml disables the check for it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/app/docker/healthcheck.py"]

ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["serve"]
