"""The stores' tests: one conformance suite for every store, and what each store adds."""

import sys

import pytest

ON_LINUX_ONLY = "the WAL-index header is found through /proc/self/maps (Linux)"
linux_only = pytest.mark.skipif(sys.platform != "linux", reason=ON_LINUX_ONLY)
