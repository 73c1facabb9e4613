"""The thorough API fuzz: schemathesis' example, boundary-value (coverage) and random phases against every
documented operation, 25 examples each. The quick suite runs a light pass of the same check (tests/test_openapi.py)."""

from __future__ import annotations

import pytest

from tests.conftest import Daemon
from tests.test_openapi import fuzz_api

pytestmark = pytest.mark.timeout(300)


def test_the_thorough_fuzz_finds_no_server_error_and_no_undocumented_status(daemon: Daemon) -> None:
    fuzz_api(daemon, phases="examples,coverage,fuzzing", max_examples=25)
