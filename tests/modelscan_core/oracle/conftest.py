"""The oracle worker, shared by every oracle test in a session (started once)."""

from __future__ import annotations

import os

import pytest

from .harness import Oracle

#: examples per fuzz test: small in CI (the whole oracle run stays under 3 minutes), large for
#: a long local run: `ORACLE_EXAMPLES=20000 pytest tests/modelscan_core/oracle -m slow`
EXAMPLES = int(os.environ.get("ORACLE_EXAMPLES", "0")) or None


@pytest.fixture(scope="session")
def oracle():
    o = Oracle()
    yield o
    o.close()
