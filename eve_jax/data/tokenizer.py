"""SentencePiece unigram tokenizer with the special ids EVE's text side needs.

Id layout (fixed by `train_tokenizer`): 0 = pad, 1 = unk, 2 = [CLS],
3 = [MASK], then the learned pieces. No BOS/EOS: the text sequence is
[CLS] w_1 ... w_n [pad ...].
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from eve_jax import storage
from eve_jax.data import shapes

CLS_PIECE = "[CLS]"
MASK_PIECE = "[MASK]"
# SentencePiece's own defaults for the unigram seed vocabulary.
_MAX_PIECE_LEN = 16
_MAX_SEEDS = 1_000_000


def _seed_pieces(texts: Sequence[str]) -> list[tuple[str, int]]:
  """All in-word substrings (2.._MAX_PIECE_LEN chars) with their frequencies.

  SentencePiece's built-in seed search only proposes substrings that are
  branching nodes of the corpus suffix array. In a small grammar a word
  like "red" is always followed by a space, so it is never proposed and
  ends up split into characters. Counting the substrings of each word type
  ourselves gives the classic unigram seed set and whole-word pieces.
  """
  word_counts = collections.Counter(w for t in texts for w in t.split())
  seeds: collections.Counter[str] = collections.Counter()
  for word, count in word_counts.items():
    word = "\u2581" + word  # SentencePiece's word-initial space marker.
    for i in range(len(word)):
      for j in range(i + 2, min(len(word), i + _MAX_PIECE_LEN) + 1):
        seeds[word[i:j]] += count
  # Sorted with the piece as tie-break so the seed file, hence the model,
  # is a pure function of the texts.
  ranked = sorted(seeds.items(), key=lambda kv: (-kv[1] * len(kv[0]), kv[0]))
  return ranked[:_MAX_SEEDS]


def train_tokenizer(
    texts: Iterable[str], model_path: str, vocab_size: int
) -> str:
  """Trains a unigram SentencePiece model in-process and writes it.

  Args:
    texts: training sentences (materialized: read twice).
    model_path: where the .model file is written (atomically).
    vocab_size: target size; a soft limit, so a grammar with fewer
      distinct pieces still trains.

  Returns:
    model_path.
  """
  texts = list(texts)
  with tempfile.TemporaryDirectory() as tmp:
    seed_file = os.path.join(tmp, "seeds.tsv")
    with open(seed_file, "w", encoding="utf-8") as f:
      f.writelines(
          f"{piece}\t{count}\n" for piece, count in _seed_pieces(texts)
      )
    model = _train_bytes(texts, vocab_size, seed_file)
  # The trainer records the temporary seed path in the model; clearing it
  # makes the bytes identical for identical texts.
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model)
  proto.trainer_spec.ClearField("seed_sentencepieces_file")
  storage.write_bytes(model_path, proto.SerializeToString(deterministic=True))
  return model_path


def _train_bytes(texts: list[str], vocab_size: int, seed_file: str) -> bytes:
  out = tempfile.SpooledTemporaryFile()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=out,
      model_type="unigram",
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      pad_id=0,
      unk_id=1,
      bos_id=-1,
      eos_id=-1,
      user_defined_symbols=[CLS_PIECE, MASK_PIECE],
      seed_sentencepieces_file=seed_file,
      character_coverage=1.0,
      # One thread: EM sums in a fixed order, so training is reproducible.
      num_threads=1,
      minloglevel=2,
  )
  out.seek(0)
  return out.read()


class Tokenizer:
  """A SentencePiece model plus EVE's special ids. Picklable (for grain workers)."""

  def __init__(self, model_path: str):
    self._model_path = model_path
    try:
      proto = storage.read_bytes(model_path)
    except (OSError, storage.StorageError) as e:
      raise ValueError(
          f"cannot read tokenizer model {model_path!r}: {e}"
      ) from None
    self._load(proto)

  def _load(self, proto: bytes) -> None:
    path = self._model_path
    try:
      sp = spm.SentencePieceProcessor(model_proto=proto)
    except (
        Exception
    ) as e:  # sentencepiece raises RuntimeError/OSError for bad protos.
      raise ValueError(
          f"corrupt tokenizer model {path!r}: {str(e).strip()}"
      ) from None
    if sp.get_piece_size() == 0:
      raise ValueError(f"corrupt tokenizer model {path!r}: empty vocabulary")
    self._sp, self._proto = sp, proto
    self._cls = sp.piece_to_id(CLS_PIECE)
    self._mask = sp.piece_to_id(MASK_PIECE)
    if sp.pad_id() < 0 or sp.unk_id() in (self._cls, self._mask):
      raise ValueError(
          f"tokenizer model {path!r} lacks pad, {CLS_PIECE} or {MASK_PIECE}; "
          "train it with train_tokenizer"
      )
    self._special = frozenset((sp.pad_id(), sp.unk_id(), self._cls, self._mask))

  def __getstate__(self) -> dict:
    return {"model_path": self._model_path, "proto": self._proto}

  def __setstate__(self, state: dict) -> None:
    self._model_path = state["model_path"]
    self._load(state["proto"])

  @property
  def model_path(self) -> str:
    return self._model_path

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def cls_id(self) -> int:
    return self._cls

  @property
  def mask_id(self) -> int:
    return self._mask

  @property
  def special_ids(self) -> frozenset[int]:
    """pad, unk, [CLS], [MASK]: never masked-word targets, skipped by decode."""
    return self._special

  def encode(self, text: str) -> list[int]:
    """Piece ids of `text`, without [CLS] or padding."""
    return self._sp.encode(text)

  def encode_batch(
      self, texts: Sequence[str], max_len: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] + pieces, truncated to max_len and right-padded.

    Returns:
      ids int32 [B, max_len] and valid bool [B, max_len] (False on padding).
    """
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}")
    rows = [[self._cls, *ids][:max_len] for ids in self._sp.encode(list(texts))]
    ids = np.full((len(rows), max_len), self.pad_id, dtype=np.int32)
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    valid = np.arange(max_len)[None, :] < lengths[:, None]
    if rows:
      ids[valid] = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows])
    return ids, valid

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, skipping pad, unk, [CLS] and [MASK]."""
    return self._sp.decode([int(i) for i in ids if int(i) not in self._special])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def word_ids(self, words: Iterable[str]) -> np.ndarray:
    """Ids of words that are single pieces: int32 [len(words)].

    Raises:
      ValueError: if a word is split into several pieces or is unknown
        (e.g. masked-word accuracy on EVE-Shapes colors needs one id each).
    """
    out = []
    for word in words:
      ids = self.encode(word)
      if len(ids) != 1 or ids[0] == self.unk_id:
        pieces = [self.id_to_piece(i) for i in ids]
        raise ValueError(f"word {word!r} is not a single piece: {pieces}")
      out.append(ids[0])
    return np.asarray(out, dtype=np.int32)


def shapes_tokenizer(
    model_path: str,
    vocab_size: int = 64,
    num_captions: int = 4000,
    seed: int = 0,
) -> Tokenizer:
  """Trains the EVE-Shapes tokenizer on `num_captions` captions and loads it.

  Raises:
    ValueError: if a visual word (color or shape) is not a single piece.
  """
  captions = (shapes.generate_caption(seed, i) for i in range(num_captions))
  tokenizer = Tokenizer(train_tokenizer(captions, model_path, vocab_size))
  tokenizer.word_ids(shapes.VISUAL_WORDS)
  return tokenizer


def load_tokenizer(path: str):
  """The tokenizer at `path`: a Hugging Face tokenizer.json (what a
  converted released-EVE checkpoint carries; chosen by a `.json` name, or
  JSON content in a run's copied DIR/tokenizer.model) or a SentencePiece
  model (everything else, unchanged).

  Returns:
    A `Tokenizer` or an `eve_jax.data.hf_tokenizer.HFTokenizer` (the same
    interface).
  """
  if not path.endswith(".json"):
    try:
      with storage.path(path).open("rb") as f:
        head = f.read(64).lstrip()
    except (OSError, storage.StorageError):
      head = b""  # Tokenizer gives the one-line error
    if not head.startswith(b"{"):
      return Tokenizer(path)
  from eve_jax.data.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top

  return HFTokenizer(path)
