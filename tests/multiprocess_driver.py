"""One process of tests/test_multiprocess.py.

Takes the CLI's own flags (--config, --workdir, --coordinator,
--num_processes, --process_id) and joins the others as `eve_jax.main` does,
trains, then writes what the test compares: the final parameters gathered
from all processes (process 0, OUT/params.npz) and, per process, which data
shard it fed and the example indices of its first batch (OUT/data_I.json).
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eve_jax import main as eve_main  # noqa: E402  (defines the CLI flags)

_OUT = flags.DEFINE_string("out", None, "Directory for the driver's outputs.")
FLAGS = flags.FLAGS


def driver(argv):
  del argv
  eve_main.init_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  from eve_jax import sharding, trainer  # pylint: disable=g-import-not-at-top
  from eve_jax.data import sources  # pylint: disable=g-import-not-at-top
  from eve_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from eve_jax.model.variants import ModelConfig  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  mesh = sharding.make_mesh(config.mesh)
  result = trainer.run(config, FLAGS.workdir, mesh)
  params = multihost_utils.process_allgather(result.state.params, tiled=True)
  flat = {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_leaves_with_path(params)
  }
  pid = jax.process_index()
  if pid == 0:
    np.savez(os.path.join(_OUT.value, "params.npz"), **flat)

  rules = sharding.parse_rules(config.axis_rules)
  bs = config.train.batch_size
  shard = sharding.process_batch_slice(
      sharding.batch_sharding(mesh, rules, bs), bs
  )
  tok = Tokenizer(os.path.join(FLAGS.workdir, "tokenizer.model"))
  model_cfg = ModelConfig.from_config(config.model, vocab_size=tok.vocab_size)
  first = next(iter(sources.make_train_data(config, tok, model_cfg, shard)))
  with open(os.path.join(_OUT.value, f"data_{pid}.json"), "w") as f:
    json.dump(
        {
            "shard": list(shard),
            "rows": int(first["text"].shape[0]),
            "indices": [int(i) for i in first["index"]],
            "local_devices": jax.local_device_count(),
            "devices": jax.device_count(),
        },
        f,
    )
  multihost_utils.sync_global_devices("driver done")


if __name__ == "__main__":
  app.run(driver)
