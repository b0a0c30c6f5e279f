"""A Hugging Face `tokenizers` model (tokenizer.json) behind eve_jax's
tokenizer interface: what the released EVE weights were trained with (a 64k
BPE), loaded for a checkpoint converted by `python -m eve_jax.convert eve`.

Text is encoded as the released code did (`tokenizer(q, padding=
"max_length", truncation=True, max_length=40)`): the tokenizer's own
post-processor adds its special tokens (e.g. `<s> ... </s>`), the first of
which is the CLS token the heads read; truncation keeps them. Needs the
`tokenizers` package (`pip install -e .[convert]`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from eve_jax import storage

# Names the common BPE / WordPiece vocabularies use for each special token.
_NAMES = {
    "pad": ("<pad>", "[PAD]"),
    "unk": ("<unk>", "[UNK]"),
    "cls": ("<s>", "[CLS]", "<cls>"),
    "mask": ("<mask>", "[MASK]"),
}


def _tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
        "a Hugging Face tokenizer (tokenizer.json) needs the "
        "`tokenizers` package: pip install -e '.[convert]'"
    ) from None
  return tokenizers


class HFTokenizer:
  """tokenizer.json + EVE's special ids; the interface of `Tokenizer`.
  Picklable (grain workers get the JSON text)."""

  def __init__(self, path: str):
    self._model_path = path
    try:
      text = storage.read_text(path)
    except (OSError, storage.StorageError) as e:
      raise ValueError(f"cannot read tokenizer {path!r}: {e}") from None
    self._load(text)

  def _load(self, text: str) -> None:
    path = self._model_path
    try:
      tok = _tokenizers().Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises its own Exception type.
      first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
      raise ValueError(f"corrupt tokenizer {path!r}: {first}") from None
    # Padding and truncation are done here, to max_len, per call.
    tok.no_padding()
    tok.no_truncation()
    self._tok, self._json = tok, text
    ids = {}
    for key, names in _NAMES.items():
      found = [tok.token_to_id(n) for n in names]
      ids[key] = next((i for i in found if i is not None), None)
    # The post-processor's first special token is the CLS the heads read.
    specials = tok.encode("", add_special_tokens=True).ids
    if specials:
      ids["cls"] = specials[0]
    missing = [k for k in ("pad", "cls", "mask") if ids[k] is None]
    if missing:
      raise ValueError(
          f"tokenizer {path!r} has no {', '.join(missing)} "
          f"token (looked for {[_NAMES[k] for k in missing]})"
      )
    self._pad, self._cls, self._mask = ids["pad"], ids["cls"], ids["mask"]
    self._unk = ids["unk"] if ids["unk"] is not None else self._pad
    special = {self._pad, self._unk, self._cls, self._mask}
    special.update(
        i for i, t in tok.get_added_tokens_decoder().items() if t.special
    )
    self._special = frozenset(special)
    self._adds_specials = bool(specials)

  def __getstate__(self) -> dict:
    return {"model_path": self._model_path, "json": self._json}

  def __setstate__(self, state: dict) -> None:
    self._model_path = state["model_path"]
    self._load(state["json"])

  @property
  def model_path(self) -> str:
    return self._model_path

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def unk_id(self) -> int:
    return self._unk

  @property
  def cls_id(self) -> int:
    return self._cls

  @property
  def mask_id(self) -> int:
    return self._mask

  @property
  def special_ids(self) -> frozenset[int]:
    return self._special

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens or padding."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(
      self, texts: Sequence[str], max_len: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """The post-processor's special tokens around the pieces (CLS first),
    truncated to max_len and right-padded.

    Returns:
      ids int32 [B, max_len] and valid bool [B, max_len] (False on padding).
    """
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not self._adds_specials:  # no post-processor: [CLS] + pieces
      rows = [[self._cls, *self.encode(t)][:max_len] for t in texts]
    else:
      # The library's truncation leaves room for the special tokens and
      # keeps them, as the released code's `tokenizer(...)` call did.
      self._tok.enable_truncation(max_length=max_len)
      try:
        rows = [
            e.ids
            for e in self._tok.encode_batch(
                list(texts), add_special_tokens=True
            )
        ]
      finally:
        self._tok.no_truncation()
    ids = np.full((len(rows), max_len), self._pad, dtype=np.int32)
    valid = np.zeros((len(rows), max_len), dtype=bool)
    for row, r in enumerate(rows):
      r = r[:max_len]
      ids[row, : len(r)] = r
      valid[row, : len(r)] = True
    return ids, valid

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, skipping the special tokens."""
    return self._tok.decode(
        [int(i) for i in ids if int(i) not in self._special]
    )

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def word_ids(self, words: Iterable[str]) -> np.ndarray:
    """Ids of words that are single tokens: int32 [len(words)]."""
    out = []
    for word in words:
      ids = self.encode(word)
      if len(ids) != 1 or ids[0] == self._unk:
        raise ValueError(
            f"word {word!r} is not a single token: "
            f"{[self.id_to_piece(i) for i in ids]}"
        )
      out.append(ids[0])
    return np.asarray(out, dtype=np.int32)
