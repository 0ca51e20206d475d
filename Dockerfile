# embedserve image. Variants from one file:
#   docker build -t embedserve:cuda .                      # CUDA 13.0 (default): host driver 580 or newer
#   docker build -t embedserve:cuda12 --build-arg CUDA=12.6 .   # CUDA 12.6: drivers R535+ (datacenter), 560+ else
#   docker build -t embedserve:cpu --build-arg VARIANT=cpu .
#   docker build -t embedserve:bge --build-arg MODEL=BAAI/bge-base-en-v1.5 .   # a Hub model baked in
# Run:
#   docker run --gpus all -p 8000:8000 embedserve:cuda                       # the embedded all-MiniLM-L6-v2
#   docker run --gpus all -p 8000:8000 -v hf-cache:/var/cache/huggingface \
#       -e EMBEDSERVE_MODEL=BAAI/bge-base-en-v1.5 embedserve:cuda            # downloaded once into the volume
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro \
#       -e EMBEDSERVE_MODEL=/models/bge-base-en-v1.5 embedserve:cuda         # a local folder
# Every flag of `embedserve serve` is also an EMBEDSERVE_* variable.

ARG VARIANT=cuda
# The CUDA the GPU image is built for: 13.0 (torch's PyPI wheel) or 12.6 (torch's cu126 wheel).
ARG CUDA=13.0

# CUDA 13.0: torch 2.13.0 from PyPI is the CUDA 13.0 build (cuda-toolkit 13.0.3, cuDNN 9.20, cuBLAS, NCCL and
# Triton 3.7 come as wheels with it), so the base is CUDA 13.0's `base` flavour: the CUDA runtime and the
# NVIDIA_REQUIRE_CUDA check, none of the cuDNN/cuBLAS libraries of the `runtime`/`cudnn` flavours that the wheels
# already bundle. It needs a host driver of 580 or newer; with an older one the container toolkit refuses
# `docker run`, or on datacenter GPUs it may start under forward compatibility, and torch then reports the
# driver too old: embedserve stops at start-up naming both CUDA versions and the CUDA=12.6 image. No kernels
# for Volta (V100) or older in the CUDA 13 wheel.
# CUDA 12.6: torch's cu126 wheel from download.pytorch.org (its CUDA 12 libraries as wheels), on CUDA 12.6's base:
# host drivers 560 or newer, and R535/R550 datacenter drivers through CUDA's minor-version compatibility (the
# base image's NVIDIA_REQUIRE_CUDA lets those branches through); kernels from Volta (sm_70) to Hopper (sm_90).
# torch >= 2.12 is what embedserve needs from its flash varlen_attn: scale, sliding windows and GQA.
# Triton compiles a small C launcher the first time a kernel runs: gcc, the C library headers and Python's
# headers must be there at run time, and its cache must be writable by the non-root user (TRITON_CACHE_DIR).
FROM nvidia/cuda:${CUDA}.2-base-ubuntu24.04 AS cuda-base
ARG CUDA
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Every install goes through the lock of tested versions (constraints.txt; README, "Develop").
COPY constraints.txt /tmp/src/
RUN if [ "$CUDA" = "13.0" ]; then pip install --no-cache-dir -c /tmp/src/constraints.txt torch==2.13.0; \
    elif [ "$CUDA" = "12.6" ]; then pip install --no-cache-dir -c /tmp/src/constraints.txt torch==2.13.0 \
        --index-url https://download.pytorch.org/whl/cu126 --extra-index-url https://pypi.org/simple; \
    else echo "CUDA must be 13.0 or 12.6, not $CUDA" >&2; exit 1; fi
# No visible GPU is a start-up error that names the cause (driver, --gpus), never a silent CPU fallback.
ENV EMBEDSERVE_DEVICE=cuda

FROM python:3.12-slim-bookworm AS cpu-base
# --quantize int8 compiles each GEMM's input levels into one pass at start-up (torch.compile's C++ backend,
# kernels/int8_passes.py): g++ must be there at run time; without it those passes run eager (logged).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU-only build keeps the image small; torch on plain PyPI would bring the CUDA libraries. Only torch comes
# from that index: its dependencies come with the project below, at the lock's versions.
COPY constraints.txt /tmp/src/
RUN pip install --no-cache-dir --no-deps -c /tmp/src/constraints.txt torch==2.13.0 \
    --index-url https://download.pytorch.org/whl/cpu
ENV EMBEDSERVE_DEVICE=cpu

# hadolint ignore=DL3006
FROM ${VARIANT}-base AS runtime
# A Hub model to bake into the image (downloaded now, served offline); empty: chosen at run time.
ARG MODEL=""
ARG REVISION=""
# Built from /tmp/src, which is removed: no source tree stays in the working directory, where `python -m
# embedserve` would import it instead of the installed package (and find its kernels/ as a top-level `kernels`).
COPY pyproject.toml README.md constraints.txt /tmp/src/
COPY embedserve /tmp/src/embedserve
COPY kernels /tmp/src/kernels
WORKDIR /opt/embedserve
# [otel]: the OpenTelemetry exporter, imported only when --otlp-endpoint is set.
RUN pip install --no-cache-dir -c /tmp/src/constraints.txt "/tmp/src[otel]" \
    && rm -rf /tmp/src \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin embedserve \
    && mkdir -p /var/cache/huggingface \
    && chown 10001 /var/cache/huggingface
USER 10001
# Hub models are cached in HF_HOME: mount a volume there to keep them across restarts (Kubernetes: the
# init container fills it). HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE work as huggingface_hub documents them.
ENV HF_HOME=/var/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1
RUN if [ -n "$MODEL" ]; then embedserve download "$MODEL" ${REVISION:+--revision "$REVISION"}; fi
# Listen on every interface inside the container; caches (Triton's compiled kernels and launcher among them)
# go to /tmp, the only other writable path when the root filesystem is read-only. A baked model is served
# offline: HF_HUB_OFFLINE is 1 exactly when MODEL was given.
ENV EMBEDSERVE_MODEL=${MODEL} \
    EMBEDSERVE_REVISION=${REVISION} \
    HF_HUB_OFFLINE=${MODEL:+1} \
    EMBEDSERVE_HOST=0.0.0.0 \
    EMBEDSERVE_PORT=8000 \
    HOME=/tmp \
    TRITON_CACHE_DIR=/tmp/triton \
    PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["embedserve", "serve"]
