r"""The toy image-text matching task (tests/toy_task/shapes_match.py) on
EVE-Shapes with the tiny model, 20 steps:

  PYTHONPATH=tests/toy_task python -m eve_jax.main \
      --config=tests/toy_task/config.py --workdir=/tmp/toy_match
"""

from eve_jax import config_lib


def get_config(arg=None):
  c = config_lib.get_pretrain_config(arg, default_variant="tiny")
  c.task = "shapes_match:ShapesMatch"
  c.train.steps = 20
  c.train.log_every = 10
  c.train.viz = False
  c.train.eval_examples = 128
  return c
