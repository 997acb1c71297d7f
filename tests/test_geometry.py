"""The index arithmetic (dw5d_jax._geometry) against brute force from the definition.

Output `o` reads, at tap `t`, input `o * s + t * r - lo`. Each property below
is checked by enumerating outputs and taps, not by re-deriving the formulas.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dw5d_jax import _geometry as g

axis = st.tuples(st.integers(1, 12), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3))
pad = st.one_of(st.sampled_from(g.PADDING_KINDS),
                st.tuples(st.integers(0, 4), st.integers(0, 4)))


def _reads(o: int, k: int, s: int, r: int, lo: int) -> list[int]:
  return [o * s + t * r - lo for t in range(k)]


@given(axis, pad)
def test_sizes_and_pads_follow_the_definition(ax, padding):
  n, k, s, r = ax
  lo, hi, out = g.resolve(n, k, s, r, padding)
  e = g.effective(k, r)
  assert e == max(_reads(0, k, 1, r, 0)) + 1
  if out < 1:  # only a window that does not fit the padded input leaves no output
    assert padding not in ("SAME", "CAUSAL") and n + lo + hi < e
    assert g.min_input_size(k, r, padding) > n
    return
  assert g.min_input_size(k, r, padding) <= n
  # Every output's window lies inside the padded input, and one more would not.
  assert max(_reads(out - 1, k, s, r, lo)) <= n + hi - 1
  if padding not in ("SAME", "CAUSAL"):
    assert max(_reads(out, k, s, r, lo)) > n + hi - 1
  if padding == "SAME":
    assert out == -(-n // s) and 0 <= hi - lo <= 1
    # No more padding than the last window needs.
    assert lo + hi == max((out - 1) * s + e - n, 0)
  if padding == "CAUSAL":
    assert out == -(-n // s) and hi == 0
    for o in range(out):  # output o sees nothing after input o * s
      assert max(_reads(o, k, s, r, lo)) == o * s
  if padding == "VALID":
    assert (lo, hi) == (0, 0)


@given(axis, pad)
def test_tight_high_pad_covers_exactly_what_is_read(ax, padding):
  n, k, s, r = ax
  lo, _, out = g.resolve(n, k, s, r, padding)
  if out < 1:
    return
  hi = g.tight_high(n, k, s, r, lo, out)
  assert max(_reads(out - 1, k, s, r, lo)) == n + hi - 1


@given(axis, pad)
def test_tap_slices_list_the_positions_each_tap_reads(ax, padding):
  n, k, s, r = ax
  lo, _, out = g.resolve(n, k, s, r, padding)
  if out < 1:
    return
  for t in range(k):
    start, limit, stride = g.tap_slice(t, s, r, out)
    padded = [o * s + t * r for o in range(out)]  # padded coordinates
    assert list(range(start, limit, stride)) == padded


@given(axis, pad, st.data())
def test_input_span_is_the_hull_of_the_windows(ax, padding, data):
  n, k, s, r = ax
  lo, _, out = g.resolve(n, k, s, r, padding)
  if out < 1:
    return
  o0 = data.draw(st.integers(0, out - 1))
  o1 = data.draw(st.integers(o0 + 1, out))
  first, stop = g.input_span(o0, o1, k, s, r, lo)
  reads = [p for o in range(o0, o1) for p in _reads(o, k, s, r, lo)]
  assert (first, stop) == (min(reads), max(reads) + 1)


@given(axis, pad, st.integers(0, 2**31 - 1))
def test_transpose_pads_give_the_input_gradient(ax, padding, seed):
  """Dilate the cotangent, pad by `transpose_pads`, correlate with the flipped kernel."""
  n, k, s, r = ax
  lo, _, out = g.resolve(n, k, s, r, padding)
  if out < 1:
    return
  rng = np.random.default_rng(seed)
  ct, w = rng.standard_normal(out), rng.standard_normal(k)
  want = np.zeros(n)  # scatter form, from the definition
  for o in range(out):
    for t, p in enumerate(_reads(o, k, s, r, lo)):
      if 0 <= p < n:
        want[p] += ct[o] * w[t]
  plo, phi = g.transpose_pads(k, r, lo, g.tight_high(n, k, s, r, lo, out))
  dilated = np.zeros((out - 1) * s + 1)
  dilated[::s] = ct
  # Negative pads crop.
  padded = np.concatenate([np.zeros(max(plo, 0)), dilated, np.zeros(max(phi, 0))])
  padded = padded[max(-plo, 0):len(padded) - max(-phi, 0)]
  flipped = w[::-1]
  e = g.effective(k, r)
  got = np.array([sum(padded[p + t * r] * flipped[t] for t in range(k))
                  for p in range(len(padded) - e + 1)])
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_symbolic_sizes():
  b, n = jax.export.symbolic_shape("b, n", constraints=("n >= 5",))
  lo, hi, out = g.resolve(n, 3, 2, 2, "SAME")
  assert out == (n + 1) // 2  # ceil(n / 2), symbolically
  assert g.resolve(n, 3, 2, 2, "VALID")[2] >= 1  # decidable from the constraint
  assert g.resolve(n, 3, 1, 1, "CAUSAL")[:2] == (2, 0)
  assert g.maximum(n - 7, 0) >= 0


@pytest.mark.parametrize("a, b, want", [(3, 5, 5), (-2, 0, 0), (7, 7, 7)])
def test_maximum_of_ints(a, b, want):
  assert g.maximum(a, b) == want


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.lists(st.integers(0, 5), min_size=1, max_size=6))
def test_stream_steps_follow_the_anchors(k, s, r, valids):
  """Chunks of `valid` frames: the real slots are the anchors (outputs o at frame o * s).

  Anchors are enumerated: output o reads frames o*s - (e - 1) .. o*s (CAUSAL,
  `_reads` with lo = e - 1), the last being its anchor. The step reads the
  window `[history; chunk]` from the phase on: slot j, tap t at window index
  phase + j*s + t*r, i.e. frame p - (e - 1) + phase + j*s + t*r.
  """
  e = g.effective(k, r)
  assert g.is_causal(k, r, "CAUSAL") and g.is_causal(k, r, (e - 1, 0))
  assert g.is_causal(k, r, "SAME") == (e == 1) and not g.is_causal(k, r, (e, 0))
  assert g.stream_ring(k, r) == (e if e > 1 else 0)
  p, phase = 0, 0  # frames seen, the phase
  for valid in valids:
    length = max(valid, 1)  # a chunk of `length` frames, the first `valid` real
    anchors = [o for o in range(p + valid) if p <= o * s < p + valid]
    assert g.stream_emitted(valid, phase, s) == len(anchors)
    slots = g.stream_slots(length, s)
    assert slots >= len(anchors)
    window = e - 1 + length + g.stream_tail(length, s)  # [history; chunk; zeros]
    for j, o in enumerate(anchors):
      frames = [p - (e - 1) + phase + j * s + t * r for t in range(k)]
      assert frames == _reads(o, k, s, r, e - 1)
    # Every slot's window fits [history; chunk; zeros] at any phase < s.
    assert phase + g.stream_window(length, k, s, r) <= window
    assert (s - 1) + g.stream_window(length, k, s, r) <= window
    p += valid
    phase = g.stream_phase(phase, valid, s)
    assert phase == (-p) % s


def test_stream_ring_rotation():
  """After the frame goes into the free slot, slot j meets tap (j - oldest) mod e."""
  e = 4
  ring = [None] * e
  head = 0
  for frame in range(10):
    ring[head] = frame
    oldest = g.stream_oldest(head, e)
    # Tap t reads frame - (e - 1) + t (undilated, causal).
    assert [ring[(oldest + t) % e] for t in range(e)] == [
        frame - (e - 1) + t if frame - (e - 1) + t >= 0 else None for t in range(e)]
    head = (head + 1) % e
