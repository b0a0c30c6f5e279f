"""Writes tests/golden/sharding_{base,large}[_scan].txt: every parameter's
layout, unrolled and with `model.scan_layers`.

  python tests/dump_sharding.py

One line per parameter: path, shape, logical axis names, and the
PartitionSpec the default `config.axis_rules` give on a 2 x 4 x 8 x 2
(data, fsdp, expert, tensor) mesh, as a TPU pod would use. tests/
test_sharding.py compares against these files, so a change of names or
rules shows up as a diff to review; rerun this script only when the change
is intended.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from eve_jax import config_lib, sharding  # noqa: E402
from eve_jax.model.heads import EVEPretrainModel  # noqa: E402
from eve_jax.model.variants import ModelConfig  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
MESH_SHAPE = dict(data=2, fsdp=4, expert=8, tensor=2)


VARIANTS = ("base", "large", "base_scan", "large_scan")


def layout(name: str) -> str:
  """The golden text for `name` (a variant, `_scan` for scan_layers) with
  the paper's 30,522-word vocabulary."""
  variant, _, scan = name.partition("_")
  cfg = ModelConfig.from_config(
      config_lib.model_config(variant, scan_layers=bool(scan)), vocab_size=30522
  )
  rules = sharding.parse_rules(sharding.DEFAULT_RULES)
  state = nnx.state(
      nnx.eval_shape(lambda: EVEPretrainModel(cfg, rngs=nnx.Rngs(0))), nnx.Param
  )
  lines = []
  for path, var in jax.tree_util.tree_leaves_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  ):
    names = tuple(var.get_metadata().get("out_sharding") or ())
    shape = var.get_value().shape
    spec = sharding.logical_to_spec(names, shape, rules, MESH_SHAPE)
    lines.append(
        f"{jax.tree_util.keystr(path)} {list(shape)} " f"{list(names)} {spec}"
    )
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  os.makedirs(GOLDEN, exist_ok=True)
  for v in VARIANTS:
    with open(os.path.join(GOLDEN, f"sharding_{v}.txt"), "w") as f:
      f.write(layout(v))
    print("wrote", os.path.join(GOLDEN, f"sharding_{v}.txt"))
