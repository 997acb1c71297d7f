"""`dw5d_jax.tune_cpu_allocator` (dw5d_jax._allocator).

Each check runs in a fresh interpreter: the setting is process-wide, and
importing the library must not change anything by itself.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import dw5d_jax as dw


def _run(code: str) -> str:
  done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, timeout=120)
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
def test_import_changes_nothing_and_the_call_stops_page_faults_on_reuse():
  out = _run(_PROBE + """
import dw5d_jax as dw
print(faults_on_reuse())
print(dw.tune_cpu_allocator())
print(faults_on_reuse())
""")
  assert out.split() == ["True", "True", "False"]


# A thread's own arena holds heaps of at most 64 MiB: 80 MiB there is mmap'd
# (and faulted in again) on every allocation, whatever the threshold.
_THREAD_PROBE = _PROBE + """
import threading
def in_a_thread():
  out = []
  t = threading.Thread(target=lambda: out.append(faults_on_reuse(80 << 20)))
  t.start()
  t.join()
  return out[0]
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
@pytest.mark.parametrize("arena_max, faults", [(None, "True"), (1, "False")])
def test_arena_max_lets_threads_reuse_large_buffers(arena_max, faults):
  out = _run(_THREAD_PROBE + f"""
import dw5d_jax as dw
print(dw.tune_cpu_allocator(arena_max={arena_max}))
print(in_a_thread())
""")
  assert out.split() == ["True", faults]


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
