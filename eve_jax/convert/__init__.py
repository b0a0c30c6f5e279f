"""PyTorch checkpoints -> eve_jax: BEiTv2 (Hugging Face, unilm, timm
layouts) and the released EVE weights (`python -m eve_jax.convert`).

Only these modules import torch (the `convert` extra), and only to read a
checkpoint; the mapping itself is NumPy.
"""
