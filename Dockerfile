# syntax=docker/dockerfile:1
# The one project image, scha-vae:0.1.0: training (torchrun / deepspeed), data preparation, evaluation
# and the MLflow tracking server of k8s/. Build from the repository root:
#   docker build -t scha-vae:0.1.0 .
#
# CUDA: python:3.11-slim is enough. The pinned torch==2.14.1 wheel (CUDA 13) brings the CUDA runtime,
# cuDNN and NCCL as pip packages (nvidia-*), and nvidia-dali-cuda130 matches it; the node only needs an
# NVIDIA driver new enough for CUDA 13 and the NVIDIA container toolkit / device plugin.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 \
    TOKENIZERS_PARALLELISM=false \
    MPLBACKEND=Agg

# libgomp1: OpenMP runtime of torch's CPU ops. tini: the ENTRYPOINT, PID 1 that forwards SIGTERM to the
# command (torchrun passes it on to the workers) and reaps zombies; k8s/ passes argv as `args` to keep it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# 1) Dependencies, in their own layer so that code changes do not reinstall torch: setup.py with empty
#    package folders installs the exact pins of install_requires and nothing of ours.
COPY setup.py ./
RUN mkdir -p models data_pipeline trainer launch \
    && pip install . \
    && pip uninstall -y scha-vae \
    && rm -rf build ./*.egg-info \
    # PostgreSQL driver of the MLflow server's backend store (k8s/mlflow); not a dependency of the library.
    && pip install psycopg2-binary==2.9.13

# 2) The project itself from setup.py, editable so that launch/app.py finds configs/ beside the code
#    (CONFIG_DIR = <parent of launch/>/configs = /app/configs): the Hydra tree is part of the image.
COPY models/ models/
COPY data_pipeline/ data_pipeline/
COPY trainer/ trainer/
COPY launch/ launch/
COPY configs/ configs/
RUN pip install --no-deps -e . \
    && python -c "from launch.app import CONFIG_DIR; import os; assert os.path.isfile(os.path.join(CONFIG_DIR, 'config.yaml')), CONFIG_DIR"

# Unprivileged user (uid/gid 1000, as the pod securityContexts of k8s/ expect); the code stays root-owned.
RUN groupadd --gid 1000 app && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin app
USER 1000:1000
# The pods run with a read-only root filesystem: everything a program writes outside the data and run volumes
# goes to two emptyDirs, /tmp (TMPDIR: torchrun's error files, MLflow's temporary artifacts) and HOME (the caches
# below: torch hub / compiled kernels, Triton, DeepSpeed's op builds, matplotlib's font cache).
ENV HOME=/home/app \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/home/app/.cache \
    TORCH_HOME=/home/app/.cache/torch \
    TRITON_CACHE_DIR=/home/app/.cache/triton \
    TORCH_EXTENSIONS_DIR=/home/app/.cache/torch_extensions \
    MPLCONFIGDIR=/home/app/.cache/matplotlib

ENTRYPOINT ["/usr/bin/tini", "--"]
# Default command: print the model zoo.
CMD ["python", "-m", "models"]
