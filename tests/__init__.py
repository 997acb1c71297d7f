"""The test suite: shared pieces in `tests.helpers`, fixtures in conftest.py."""
