"""The real-GPU check builds a node-runtime test site (tests/root/conftest.py) of its own."""

from __future__ import annotations

import os

import pytest

from tests.root.conftest import Site, spotless, users  # noqa: F401 - the users fixture


@pytest.fixture(scope="session")
def gpu_site(users):  # noqa: F811
    node = Site(f"/run/shifter-gpu-{os.getpid()}")  # not the root tests' site: both may run in one session
    node.make()
    yield node
    node.destroy()


@pytest.fixture
def clean_gpu_site(gpu_site):
    """The site, checked to be spotless after the test (every environment torn down first)."""
    yield from spotless(gpu_site)
