"""SentencePiece tokenizer: special ids, round trips, batching, errors."""

import pickle
import time

import numpy as np
import pytest

from eve_jax.data import shapes
from eve_jax.data.tokenizer import Tokenizer, shapes_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return shapes_tokenizer(str(tmp_path_factory.mktemp("tok") / "shapes.model"))


def test_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.mask_id) == (0, 1, 2, 3)
  assert tok.id_to_piece(2) == "[CLS]" and tok.id_to_piece(3) == "[MASK]"
  assert tok.special_ids == {0, 1, 2, 3}
  assert 20 < tok.vocab_size <= 64


def test_round_trip_on_held_out_captions(tok):
  # The tokenizer was trained on stream 0; these come from another stream.
  for i in range(300):
    caption = shapes.generate_caption(123, i)
    ids = tok.encode(caption)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == caption


def test_visual_words_are_single_pieces(tok):
  ids = tok.word_ids(shapes.VISUAL_WORDS)
  assert ids.dtype == np.int32 and ids.shape == (len(shapes.VISUAL_WORDS),)
  assert len(set(ids.tolist())) == len(ids)
  assert not set(ids.tolist()) & tok.special_ids
  assert [tok.id_to_piece(i) for i in ids] == [
      "\u2581" + w for w in shapes.VISUAL_WORDS
  ]
  # The same ids appear when the words occur inside a caption.
  caption_ids = tok.encode("a small purple cross left of a large green circle")
  assert set(
      tok.word_ids(["purple", "cross", "green", "circle"]).tolist()
  ) <= set(caption_ids)


@pytest.mark.parametrize("word", ["redcircle", "zebra"])
def test_word_ids_rejects_split_words(tok, word):
  with pytest.raises(ValueError, match=word):
    tok.word_ids(["red", word])


def test_encode_batch_cls_padding_truncation(tok):
  captions = [shapes.generate_caption(9, i) for i in range(6)]
  encoded = [tok.encode(c) for c in captions]
  longest = max(len(e) for e in encoded)
  ids, valid = tok.encode_batch(captions, longest + 4)
  assert ids.dtype == np.int32 and valid.dtype == bool
  assert ids.shape == valid.shape == (6, longest + 4)
  for row, row_valid, e in zip(ids, valid, encoded):
    pad = longest + 3 - len(e)
    assert row.tolist() == [tok.cls_id, *e] + [tok.pad_id] * pad
    assert row_valid.tolist() == [True] * (len(e) + 1) + [False] * pad

  ids, valid = tok.encode_batch(captions, 3)
  for row, e in zip(ids, encoded):
    assert row.tolist() == [tok.cls_id, *e[:2]]
  assert valid.all()

  ids, valid = tok.encode_batch([], 5)
  assert ids.shape == valid.shape == (0, 5)


def test_decode_skips_specials(tok):
  caption = "a large white triangle"
  ids, _ = tok.encode_batch([caption], 12)
  assert tok.decode(ids[0]) == caption
  masked = ids[0].copy()
  masked[3] = tok.mask_id  # "white" -> [MASK]
  assert tok.decode(masked) == "a large triangle"


def test_training_is_deterministic_and_fast(tmp_path):
  captions = [shapes.generate_caption(1, i) for i in range(5000)]
  start = time.perf_counter()
  a = train_tokenizer(captions, str(tmp_path / "a.model"), 64)
  assert time.perf_counter() - start < 5.0
  b = train_tokenizer(iter(captions), str(tmp_path / "sub" / "b.model"), 64)
  assert open(a, "rb").read() == open(b, "rb").read()
  other = train_tokenizer(
      captions[:100] + ["a zebra"], str(tmp_path / "c.model"), 64
  )
  assert open(a, "rb").read() != open(other, "rb").read()


def test_pickle_round_trip(tok):
  copy = pickle.loads(pickle.dumps(tok))
  caption = shapes.generate_caption(0, 0)
  assert copy.encode(caption) == tok.encode(caption)
  assert copy.mask_id == tok.mask_id


@pytest.mark.parametrize(
    "content", [None, b"", b"not a sentencepiece model \x00\xff"]
)
def test_bad_model_file_raises_naming_the_file(tmp_path, content):
  path = tmp_path / "broken_tokenizer.model"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(ValueError) as info:
    Tokenizer(str(path))
  message = str(info.value)
  assert str(path) in message
  assert "\n" not in message
