"""setuptools' build backend, plus jaxlib (the FFI headers) for wheel builds only.

A wheel (`pip install .`, `pip wheel .`) carries the prebuilt native kernels,
compiled against jaxlib's headers (setup.py); an editable install
(`pip install -e .`, what the Makefile does) and an sdist need no jaxlib, so
they do not download it into the isolated build environment.
"""

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - the whole backend interface


def get_requires_for_build_wheel(config_settings=None):
  return [*_setuptools.get_requires_for_build_wheel(config_settings), "jaxlib>=0.10"]
