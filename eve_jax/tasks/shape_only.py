"""A fine-tuning task without its data, for compiling its step."""

from __future__ import annotations


class WithoutData:
  """Mixed into each fine-tuning task class: `without_data` makes the task
  with no examples, enough to build its model and training step (`python
  -m eve_jax.compile`, eve_jax/aot/build.py); no file is read. A task whose
  model needs a size the data would give (VQA's answers) sets it in
  `_sizes`."""

  @classmethod
  def without_data(cls, config, tokenizer, model_cfg, **sizes):
    self = cls.__new__(cls)
    self.tokenizer, self.model_cfg = tokenizer, model_cfg
    self.train_examples, self.num_train = [], 0
    self._sizes(config, **sizes)
    return self

  def _sizes(self, config, **sizes) -> None:
    del config, sizes
