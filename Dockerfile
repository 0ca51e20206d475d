# embedserve image. Two variants from one file:
#   docker build -t embedserve:cuda .                      # CUDA (default)
#   docker build -t embedserve:cpu --build-arg VARIANT=cpu .
# Run:
#   docker run --gpus all -p 8000:8000 embedserve:cuda                       # the embedded all-MiniLM-L6-v2
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro \
#       -e EMBEDSERVE_MODEL=/models/bge-base-en-v1.5 embedserve:cuda
# Every flag of `embedserve serve` is also an EMBEDSERVE_* variable.

ARG VARIANT=cuda

# PyPI's Linux x86_64 torch 2.9.1 wheel is the CUDA 12.8 build: the base image carries the matching runtime.
# (torch >= 2.12, whose PyPI wheels are CUDA 13 builds, adds what embedserve needs from torch's own flash
# varlen attention: scale, windows, GQA. With 2.9 the CUDA path attends with SDPA, logged at start-up.)
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS cuda-base
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir torch==2.9.1

FROM python:3.12-slim-bookworm AS cpu-base
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU-only build keeps the image small; torch on plain PyPI would bring the CUDA libraries.
RUN pip install --no-cache-dir torch==2.9.1 --index-url https://download.pytorch.org/whl/cpu

# hadolint ignore=DL3006
FROM ${VARIANT}-base AS runtime
WORKDIR /opt/embedserve
COPY pyproject.toml README.md ./
COPY embedserve ./embedserve
COPY kernels ./kernels
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin embedserve
USER 10001
# Listen on every interface inside the container; nothing is fetched at run time; caches go to /tmp
# (the only writable path when the root filesystem is read-only).
ENV EMBEDSERVE_HOST=0.0.0.0 \
    EMBEDSERVE_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/tmp \
    TRITON_CACHE_DIR=/tmp/triton \
    PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["embedserve", "serve"]
