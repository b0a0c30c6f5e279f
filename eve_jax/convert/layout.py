"""eve_jax's parameter tree built from PyTorch-style tensors, and back.

PyTorch Linear weights are [out, in]; eve_jax kernels are [in, out] (the
attention ones split by head: q/k/v [D, H, K], out [H, K, D]). Conv patch
weights are [out, in, kh, kw]; eve_jax's patch kernel is [kh, kw, in, out].
Every function here is an exact reshuffle (transposes and reshapes), so
converting there and back gives the same bits.

Legend: D width, H heads, K head dim, F FFN hidden, M modalities, E experts.
"""

from __future__ import annotations

import numpy as np


def linear_in(weight: np.ndarray) -> np.ndarray:
  """torch [out, in] -> eve_jax [in, out]."""
  return np.ascontiguousarray(weight.T)


def patch_kernel(weight: np.ndarray) -> np.ndarray:
  """Conv [D, C, P, P] -> [P, P, C, D]."""
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def patch_weight(kernel: np.ndarray) -> np.ndarray:
  """[P, P, C, D] -> conv [D, C, P, P]."""
  return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def norm(weight: np.ndarray, bias: np.ndarray) -> dict:
  return {"scale": weight, "bias": bias}


def attention(q_w, k_w, v_w, q_b, v_b, out_w, out_b, heads: int) -> dict:
  """q/k/v weights [D, D] (torch), q/v biases [D], out [D, D] and [D] ->
  eve_jax Attention params. BEiT has no k bias (it cancels in softmax)."""
  d = q_w.shape[1]
  k = d // heads
  return {
      "q_kernel": linear_in(q_w).reshape(d, heads, k),
      "k_kernel": linear_in(k_w).reshape(d, heads, k),
      "v_kernel": linear_in(v_w).reshape(d, heads, k),
      "q_bias": q_b.reshape(heads, k),
      "v_bias": v_b.reshape(heads, k),
      "out_kernel": linear_in(out_w).reshape(heads, k, d),
      "out_bias": out_b,
  }


def attention_torch(p: dict) -> tuple[np.ndarray, ...]:
  """eve_jax Attention params -> (q_w, k_w, v_w, q_b, v_b, out_w, out_b)
  in torch's [out, in] form."""
  d, h, k = p["q_kernel"].shape

  def w(x):
    return np.ascontiguousarray(x.reshape(d, h * k).T)

  return (
      w(p["q_kernel"]),
      w(p["k_kernel"]),
      w(p["v_kernel"]),
      p["q_bias"].reshape(h * k),
      p["v_bias"].reshape(h * k),
      np.ascontiguousarray(p["out_kernel"].reshape(h * k, d).T),
      p["out_bias"],
  )


def hard_ffn(norms, fc1s, fc2s) -> dict:
  """One (LayerNorm, fc1, fc2) per modality -> ModalityFFN params.

  Args:
    norms: M (weight [D], bias [D]) pairs.
    fc1s: M (weight [F, D], bias [F]) pairs.
    fc2s: M (weight [D, F], bias [D]) pairs.
  """
  return {
      "norm_scale": np.stack([w for w, _ in norms]),
      "norm_bias": np.stack([b for _, b in norms]),
      "wi": np.stack([linear_in(w) for w, _ in fc1s]),
      "bi": np.stack([b for _, b in fc1s]),
      "wo": np.stack([linear_in(w) for w, _ in fc2s]),
      "bo": np.stack([b for _, b in fc2s]),
  }


def experts(fc1s, fc2s) -> dict:
  """E (fc1 (weight [F, D], bias [F]), fc2 (weight [D, F], bias [D])) ->
  the stacked expert params of ModalityMoE: wi, bi, wo, bo."""
  return {
      "wi": np.stack([linear_in(w) for w, _ in fc1s]),
      "bi": np.stack([b for _, b in fc1s]),
      "wo": np.stack([linear_in(w) for w, _ in fc2s]),
      "bo": np.stack([b for _, b in fc2s]),
  }


def soft_ffn(router_w, modality_embed, fc1s, fc2s) -> dict:
  """Router [E, D] (torch Linear), modality embeddings [M, D] and E
  (fc1, fc2) pairs -> ModalityMoE params."""
  return {
      "kernel": linear_in(router_w),
      "modality_embed": modality_embed,
      **experts(fc1s, fc2s),
  }


def ffn_torch(p: dict, i: int) -> tuple[np.ndarray, ...]:
  """FFN i (modality or expert) of a stacked FFN -> (fc1_w, fc1_b, fc2_w,
  fc2_b) in torch's form."""
  return (
      np.ascontiguousarray(p["wi"][i].T),
      p["bi"][i],
      np.ascontiguousarray(p["wo"][i].T),
      p["bo"][i],
  )


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def path_str(path: tuple) -> str:
  return "/".join(str(k) for k in path)
