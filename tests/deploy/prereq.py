"""The suite's rule for a missing prerequisite (root, a tool), as the Rust tests' harness has it.

The test fails, saying how to get it, unless CI_RUNNER_TEST_SKIP (comma-separated) lists it or
`all`; then it is skipped. With CI set nothing may be skipped.
"""

import os
import unittest


def missing(what, fix):
    listed = [s.strip() for s in os.environ.get("CI_RUNNER_TEST_SKIP", "").split(",")]
    if (what in listed or "all" in listed) and not os.environ.get("CI"):
        raise unittest.SkipTest(f"skipping (CI_RUNNER_TEST_SKIP): {what} is missing: {fix}")
    raise AssertionError(
        f"{what} is missing: {fix} (or skip the tests that need it with CI_RUNNER_TEST_SKIP={what}, never on CI)"
    )
