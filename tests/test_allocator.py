"""`dw5d_jax.tune_cpu_allocator` (dw5d_jax._allocator).

Each check runs in a fresh interpreter: the setting is process-wide, and
importing the library applies it unless `DW5D_JAX_TUNE_ALLOCATOR=0` or the
environment sets glibc's malloc itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import dw5d_jax as dw


def _run(code: str, **env: str) -> str:
  """Runs `code` in a fresh interpreter, without glibc malloc variables unless given in `env`."""
  base = {k: v for k, v in os.environ.items()
          if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "DW5D_JAX_TUNE_ALLOCATOR")}
  done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, timeout=120, env={**base, **env})
  assert done.returncode == 0, done.stderr
  return done.stdout.strip()


GLIBC = sys.platform.startswith("linux") and _run(
    "import platform; print(platform.libc_ver()[0])") == "glibc"

# What the setting is for: a large buffer that is freed and allocated again
# should reuse already-mapped pages, not page-fault 64 MiB in afresh.
_PROBE = """
import ctypes, ctypes.util, resource
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def faults_on_reuse(n=64 << 20):
  for _ in range(2):
    p = libc.malloc(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(p, 1, n)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(p)
  return faults > 1000  # 64 MiB is 16384 pages of 4 KiB
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_import_tunes_the_allocator():
  out = _run(_PROBE + """
print(faults_on_reuse())
import dw5d_jax as dw
from dw5d_jax import _allocator
print(faults_on_reuse(), repr(_allocator.AT_IMPORT))
""")
  assert out.splitlines() == ["True", "False 'tuned'"]


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_opting_out_leaves_glibc_alone_and_the_call_still_tunes():
  out = _run(_PROBE + """
import dw5d_jax as dw
from dw5d_jax import _allocator
print(faults_on_reuse(), repr(_allocator.AT_IMPORT))
print(dw.tune_cpu_allocator())
print(faults_on_reuse())
""", DW5D_JAX_TUNE_ALLOCATOR="0")
  assert out.splitlines() == [
      "True 'left alone (DW5D_JAX_TUNE_ALLOCATOR=0)'", "True", "False"]


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_glibc_variables_set_by_the_user_win(env):
  # The user's own setting (a fixed 128 KiB threshold) keeps 64 MiB buffers
  # mmap'd; with only MALLOC_ARENA_MAX the thresholds stay glibc's too.
  out = _run(_PROBE + """
import dw5d_jax as dw
from dw5d_jax import _allocator
print(faults_on_reuse(), repr(_allocator.AT_IMPORT))
""", **env)
  assert out == "True 'left to the environment (glibc malloc variables set)'"


def test_an_unknown_opt_out_value_warns_and_changes_nothing():
  out = _run("""
import warnings
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  import dw5d_jax
from dw5d_jax import _allocator
print([str(w.message) for w in caught if w.category is RuntimeWarning])
print(_allocator.AT_IMPORT)
""", DW5D_JAX_TUNE_ALLOCATOR="yes")
  warned, state = out.splitlines()
  assert "dw5d_jax: `DW5D_JAX_TUNE_ALLOCATOR` must be 0 (leave glibc's malloc alone) or 1" in warned
  assert "got 'yes'" in warned
  assert state == "left alone (DW5D_JAX_TUNE_ALLOCATOR='yes' is not 0 or 1)"


# What the import is for: XLA's fresh 40 MiB output of a jitted pass is
# page-faulted in on every call under glibc's defaults (10240 pages a call).
# With the import's setting the heap grows until it holds the few buffers
# XLA has alive at once, and is never trimmed, so only those first calls
# fault (measured: up to about 12 of 40 calls under load, then none).
# The probe prints the faults of 60 calls in buffers' worth (10240 pages).
_XLA_PROBE = """
import resource
import dw5d_jax as dw
import jax, jax.numpy as jnp
x = jnp.ones((10, 1024, 1024), jnp.float32)
f = jax.jit(lambda a: a * 2 + 1)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(60):
  f(x).block_until_ready()
print(round((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10240))
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_xla_outputs_are_not_page_faulted_on_every_call():
  tuned = int(_run(_XLA_PROBE))
  untouched = int(_run(_XLA_PROBE, DW5D_JAX_TUNE_ALLOCATOR="0"))
  assert untouched >= 58, untouched  # every call
  assert tuned <= 25, tuned


def test_without_glibc_it_warns_and_returns_false(monkeypatch):
  from dw5d_jax import _allocator
  monkeypatch.setattr(_allocator.sys, "platform", "darwin")
  with pytest.warns(RuntimeWarning, match=r"tune_cpu_allocator: this process does not use "
                    r"glibc's malloc \(platform darwin\); nothing was changed"):
    assert dw.tune_cpu_allocator() is False


@pytest.mark.parametrize("kwargs, error, message", [
    ({"mmap_threshold": 1.5}, TypeError,
     r"tune_cpu_allocator: `mmap_threshold` must be an int \(bytes\), got float 1.5"),
    ({"trim_threshold": True}, TypeError, r"`trim_threshold` must be an int \(bytes\)"),
    ({"mmap_threshold": 2**31}, ValueError,
     r"tune_cpu_allocator: `mmap_threshold` must be in \[0, 2\*\*31 - 1\] \(mallopt takes a "
     r"C int\), got 2147483648"),
    ({"trim_threshold": -1}, ValueError, r"`trim_threshold` must be in \[0, 2\*\*31 - 1\]"),
    ({"arena_max": "1"}, TypeError,
     r"tune_cpu_allocator: `arena_max` must be None or an int \(arenas\), got str '1'"),
    ({"arena_max": 0}, ValueError,
     r"tune_cpu_allocator: `arena_max` must be in \[1, 2\*\*31 - 1\], got 0"),
])
def test_bad_thresholds_are_rejected(kwargs, error, message):
  with pytest.raises(error, match=message):
    dw.tune_cpu_allocator(**kwargs)
