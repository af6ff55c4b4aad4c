# REAP-VLM: GPU image. torch 2.14.1's Linux wheel is built for CUDA 13.0, so the base matches it.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    MPLBACKEND=Agg \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's python3 is the interpreter; versions follow the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 reap \
    && mkdir -p /app /cache/huggingface /models /app/outputs \
    && chown -R reap:reap /app /cache /models

WORKDIR /app

# Dependencies first: code changes do not reinstall them.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY --chown=reap:reap pyproject.toml README.md reap.py prune_model.py test_pruned_model.py ./
COPY --chown=reap:reap reap_vlm ./reap_vlm
COPY --chown=reap:reap calibration ./calibration

USER 1000:1000
VOLUME ["/cache/huggingface"]
ENTRYPOINT ["python3"]
CMD ["reap.py", "--help"]
