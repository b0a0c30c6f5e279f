"""EVE-Shapes generator: determinism, caption/image agreement, layout, statistics."""

import collections

import numpy as np
import pytest

from eve_jax.data import shapes


def _parse_caption(caption: str) -> list[tuple[str, str, str]]:
  """Independent reading of the grammar: [(size, color, shape)] left to right."""
  out = []
  for phrase in caption.split(" left of "):
    article, size, color, shape = phrase.split(" ")
    assert article == "a"
    out.append((size, color, shape))
  return out


def test_vocabulary_constants():
  assert list(shapes.COLORS) == [
      "red",
      "green",
      "blue",
      "yellow",
      "purple",
      "white",
  ]
  assert shapes.VISUAL_WORDS == tuple(shapes.COLORS) + shapes.SHAPES
  assert len(set(shapes.VISUAL_WORDS)) == 10
  rgb = np.array(
      list(shapes.COLORS.values()) + [shapes.BACKGROUND], dtype=np.float32
  )
  distances = np.linalg.norm(rgb[:, None] - rgb[None, :], axis=-1)
  np.fill_diagonal(distances, np.inf)
  assert distances.min() > 100, "colors (and background) must be well separated"


def test_same_seed_index_is_bitwise_identical():
  a, b = shapes.generate(3, 17), shapes.generate(3, 17)
  assert a.image.tobytes() == b.image.tobytes()
  assert a.object_masks.tobytes() == b.object_masks.tobytes()
  assert a.caption == b.caption and a.objects == b.objects


def test_different_index_or_seed_differs():
  # The world is small (48 distinct one-object scenes), so streams are
  # compared index by index rather than as sets.
  a = [shapes.generate(0, i).image.tobytes() for i in range(100)]
  b = [shapes.generate(1, i).image.tobytes() for i in range(100)]
  assert len(set(a)) > 80
  assert sum(x != y for x, y in zip(a, b)) > 90


def test_generate_caption_matches_generate():
  for i in range(100):
    assert (
        shapes.generate_caption(4, i)
        == shapes.generate(4, i, image_size=48).caption
    )


def test_caption_independent_of_image_size():
  for i in range(20):
    assert (
        shapes.generate(2, i, 24).caption == shapes.generate(2, i, 224).caption
    )


@pytest.mark.parametrize("image_size", [24, 32, 64, 224])
def test_image_matches_caption_and_masks(image_size):
  background = np.array(shapes.BACKGROUND, dtype=np.uint8)
  n_samples = 200 if image_size <= 64 else 30
  for i in range(n_samples):
    ex = shapes.generate(7, i, image_size)
    assert (
        ex.image.shape == (image_size, image_size, 3)
        and ex.image.dtype == np.uint8
    )
    assert ex.object_masks.shape == (3, image_size, image_size)
    assert ex.object_masks.dtype == bool
    described = _parse_caption(ex.caption)
    assert described == [(o.size, o.color, o.shape) for o in ex.objects]
    n = len(ex.objects)
    assert 1 <= n <= 3
    # Slots beyond the object count are empty; objects never overlap.
    assert not ex.object_masks[n:].any()
    assert ex.object_masks.sum(axis=0).max() <= 1
    for k, obj in enumerate(ex.objects):
      mask = ex.object_masks[k]
      assert mask.sum() >= 3, (i, obj)
      assert (ex.image[mask] == shapes.COLORS[obj.color]).all()
      # The object lies inside one grid column, so objects never overlap.
      cols = np.nonzero(mask.any(axis=0))[0]
      column = image_size / shapes.GRID
      c = int(obj.x_center // column)
      assert (
          cols.min() + 0.5 >= c * column
          and cols.max() + 0.5 <= (c + 1) * column
      )
      centroid_x = np.nonzero(mask)[1].mean() + 0.5
      assert abs(centroid_x - obj.x_center) < 0.2 * image_size
    xs = [o.x_center for o in ex.objects]
    assert xs == sorted(xs)
    outside = ~ex.object_masks.any(axis=0)
    assert (ex.image[outside] == background).all()


def test_sizes_are_separable():
  """At 64 px (the tiny config) every large shape covers more pixels than any
  small one of its kind, about 2.7x on average."""
  areas = collections.defaultdict(list)
  for i in range(600):
    ex = shapes.generate(11, i, 64)
    for k, obj in enumerate(ex.objects):
      areas[obj.shape, obj.size].append(int(ex.object_masks[k].sum()))
  for shape in shapes.SHAPES:
    small, large = areas[shape, "small"], areas[shape, "large"]
    assert small and large
    assert min(large) > max(small), (shape, min(large), max(small))
    assert np.mean(large) > 2.2 * np.mean(small)


def test_object_count_frequencies_and_coverage():
  counts = collections.Counter()
  words = collections.Counter()
  for i in range(2000):
    parsed = _parse_caption(shapes.generate_caption(5, i))
    counts[len(parsed)] += 1
    words.update(w for obj in parsed for w in obj)
  freqs = np.array([counts[1], counts[2], counts[3]]) / 2000
  # 0.05 is > 4 standard deviations for n = 2000.
  np.testing.assert_allclose(freqs, [0.4, 0.4, 0.2], atol=0.05)
  for word in shapes.VISUAL_WORDS + shapes.SIZES:
    assert words[word] > 100, word


def test_blank_image():
  blank = shapes.blank_image(40)
  assert blank.shape == (40, 40, 3) and blank.dtype == np.uint8
  assert (blank == np.array(shapes.BACKGROUND, dtype=np.uint8)).all()
