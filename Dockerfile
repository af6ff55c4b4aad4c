# REAP-VLM GPU image. `./run.sh build` builds it; `./run.sh reap|prune|test|all|demo|verify` run in it.
# The CUDA version of the base matches the pinned torch 2.14.1 wheel (built for CUDA 13.0, `torch.version.cuda`):
# the wheel brings its own CUDA libraries, the base brings the NVIDIA container hooks and the driver check
# (NVIDIA_REQUIRE_CUDA refuses to start on a driver too old for CUDA 13.0 instead of failing later).
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

# Caches live under /cache, a named volume (downloads and compiled kernels survive the container).
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/reap \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    MPLBACKEND=Agg \
    PATH=/opt/venv/bin:$PATH

# python3 runs the stages; gcc, libc6-dev and python3-dev let Triton build its small launcher when scoring uses
# torch.compile on CUDA. Versions follow the pinned base image: pinning apt versions breaks the build as soon as
# Ubuntu replaces a package with a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# A non-root user, uid 1000 (Ubuntu 24.04 images already hold `ubuntu` with that uid: it makes way).
# ./run.sh runs the container as the calling user's uid:gid so that files in ./outputs are theirs: the home
# folder and the caches are therefore open to any uid, sticky like /tmp.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid 1000 reap \
    && useradd --uid 1000 --gid 1000 --create-home reap \
    && mkdir -p /app/outputs /models /cache/huggingface \
    && chown reap:reap /app/outputs /models \
    && chmod 1777 /home/reap /cache /cache/huggingface

WORKDIR /app

# Dependencies first: a code change does not reinstall them.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# The code, owned by root and read-only for the user that runs it.
COPY reap.py prune_model.py test_pruned_model.py ./
COPY reap_vlm ./reap_vlm
COPY calibration ./calibration

USER 1000:1000
ENTRYPOINT ["python3"]
CMD ["reap.py", "--help"]
