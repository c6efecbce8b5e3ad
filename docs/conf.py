"""Sphinx configuration for the dbpool documentation."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Document the source tree next to this file, whether or not dbpool is installed.
sys.path.insert(0, str(ROOT))


def _project_version() -> str:
    """Read the version from pyproject.toml, the single place it is written."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        if match is None:
            raise RuntimeError("no version in pyproject.toml") from None
        return match.group(1)
    return str(tomllib.loads(text)["project"]["version"])


project = "dbpool"
author = "the dbpool authors"
copyright = "the dbpool authors"
release = _project_version()
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc"]

# Builds run offline: no intersphinx inventories are fetched.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"

exclude_patterns = ["_build"]

html_theme = "alabaster"
html_static_path: list[str] = []
