"""dbpool's static types, checked by running mypy on the files in tests/typing.

``check_types.py`` must type-check cleanly: its ``assert_type`` calls pin what mypy infers for
pools, leases, transactions and hooks.  ``check_types_fail.py`` holds misuses, each marked
``# error: CODE``: every marked line must get an error with that code and no other line may get
one, so a misuse is rejected for the reason the marker gives and not by accident.

mypy comes with the ``lint`` extra; without it these tests are skipped, or fail when
``DBPOOL_REQUIRE_SERVERS`` is set (as in CI, where .ci/run installs the extra).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parent.parent
CHECKS = Path("tests", "typing")  # relative to ROOT, as mypy names the files it reports on
PASSING = CHECKS / "check_types.py"
FAILING = CHECKS / "check_types_fail.py"

MYPY_TIMEOUT = 100  # seconds: a first run, with no cache, on a loaded machine
EXPECTED = re.compile(r"#\s*error:\s*([a-z][a-z-]*)\s*$")
REPORTED = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+):(?:\d+:)? error: .*\[(?P<code>[a-z-]+)\]$")

Errors = dict[tuple[str, int], set[str]]  # (path, line) -> error codes


@pytest.fixture(scope="module")
def mypy_output() -> str:
    """What mypy prints for both files, from one run (the configuration in pyproject.toml)."""
    if importlib.util.find_spec("mypy") is None:
        unavailable("mypy is not installed: pip install -e '.[lint]'")
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--show-error-codes",
        "--no-error-summary",
        "--no-pretty",
        "--no-color-output",
        str(PASSING),
        str(FAILING),
    ]
    proc = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=MYPY_TIMEOUT, check=False
    )
    # 0: no error, 1: errors reported; anything else is mypy failing to run
    assert proc.returncode in (0, 1), (
        f"mypy exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    )
    return proc.stdout


@pytest.fixture(scope="module")
def reported(mypy_output: str) -> Errors:
    errors: Errors = {}
    for line in mypy_output.splitlines():
        match = REPORTED.match(line)
        if match:
            key = (Path(match["path"]).as_posix(), int(match["line"]))
            errors.setdefault(key, set()).add(match["code"])
        elif ": error:" in line:
            pytest.fail(f"mypy reported an error with no code: {line}")
    return errors


def expected_errors(path: Path) -> Errors:
    expected: Errors = {}
    for number, line in enumerate((ROOT / path).read_text().splitlines(), start=1):
        match = EXPECTED.search(line)
        if match:
            expected[(path.as_posix(), number)] = {match[1]}
    return expected


def only(errors: Errors, path: Path) -> Errors:
    return {key: codes for key, codes in errors.items() if key[0] == path.as_posix()}


def describe(errors: Errors) -> str:
    return "\n".join(f"  {p}:{n}: {', '.join(sorted(c))}" for (p, n), c in sorted(errors.items()))


@pytest.mark.timeout(MYPY_TIMEOUT + 20)
def test_the_public_api_has_the_documented_types(mypy_output: str, reported: Errors) -> None:
    errors = only(reported, PASSING)
    assert not errors, f"{PASSING} must type-check; mypy reports:\n{mypy_output}"


@pytest.mark.timeout(MYPY_TIMEOUT + 20)
def test_each_misuse_is_rejected_for_its_own_reason(reported: Errors) -> None:
    expected = expected_errors(FAILING)
    assert len(expected) >= 5, "the markers were not found"
    errors = only(reported, FAILING)
    missing = {key: codes - errors.get(key, set()) for key, codes in expected.items()}
    missing = {key: codes for key, codes in missing.items() if codes}
    unexpected = {key: codes for key, codes in errors.items() if key not in expected}
    assert not missing and not unexpected, (
        f"lines of {FAILING} that mypy accepts, or rejects with another code (wanted):\n"
        f"{describe(missing) or '  none'}\n"
        f"errors on lines not marked '# error: CODE':\n{describe(unexpected) or '  none'}"
    )
