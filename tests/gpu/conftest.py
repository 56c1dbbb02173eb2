"""The real-GPU check reuses the node-runtime test site (tests/root/conftest.py)."""

from tests.root.conftest import clean_site, site, users  # noqa: F401 - fixtures
