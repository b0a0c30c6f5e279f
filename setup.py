"""eve_jax: EVE (masked signal modeling + modality-aware MoE) in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="eve_jax",
    version="0.1.0",
    description=(
        "EVE vision-language pretraining (masked pixels + masked words, "
        "modality-aware Mixture of Experts) in JAX/Flax NNX."
    ),
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["eve_jax", "eve_jax.*"]),
    install_requires=[
        # jax 0.10.2 is the newest release that supports Python 3.11.
        "jax>=0.10.2",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.6",  # optax.tree.norm
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.8",
        "ml_collections>=1.0",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "pillow>=10",
        "importlib_resources>=6",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
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
        "compile": ["jax[tpu]>=0.10.2"],
        # Accelerator builds of the same jax (launch/README.md).
        "tpu": ["jax[tpu]>=0.10.2"],
        "cuda12": ["jax[cuda12]>=0.10.2"],
    },
)
