"""Every Python code block of the documentation runs, so that no example can rot.

The pages are ``README.rst`` and every ``.rst`` file under ``docs/`` (``_build`` left out), found
when the tests are collected: a page added later is tested without touching this file.  A block
is a ``.. code-block:: python`` directive (or ``code`` / ``sourcecode``, ``python3``, ``py``),
read by indentation, with no dependency on docutils.  ``literalinclude`` is not read here: the
example files it shows are run by ``tests/test_examples.py``.

How a page runs (one test per page, id = its path):

* its blocks run in order, in one namespace shared by the page, so a block may use what an
  earlier block of the same page defined;
* in a temporary working directory, so the SQLite files the examples make land there;
* against the local servers the docs name, exactly as written (``host=127.0.0.1 dbname=test
  user=postgres``, ``root@127.0.0.1/test``; see ``DEVELOPERS.md``).  A page that mentions
  PostgreSQL or MariaDB drivers or URLs is skipped when that server cannot be reached (a failure
  under ``DBPOOL_REQUIRE_SERVERS=1``).  On PostgreSQL, ``PGOPTIONS`` gives the page's sessions a
  schema of their own as ``search_path``, dropped afterwards, so the tables the examples create
  (``accounts``, ``orders``, ...) neither collide with other tests nor stay behind;
* a failure names the page and the line of the block (tracebacks show ``.rst`` line numbers);
* a :exc:`ResourceWarning` while the page runs (a pool, lease or cursor dropped without being
  closed) fails the page, naming the block after which it appeared.  Pools still open when the
  last block has run are closed here: a page may end with an open pool, but must not lose one.

A block the test cannot run is marked in the page with ``:class: no-run`` (Sphinx accepts the
option and ignores it); it must still compile.  Keep these few: a block that needs only a pool,
a table or a server the docs already use should create them, not be skipped.  The marked blocks,
and why:

* ``docs/drivers.rst``, the dialect for python-oracledb: needs an Oracle server and driver, which
  the test environment does not have.

Shell commands, server configuration and output belong in ``code-block:: sh`` / ``text`` (or a
``::`` block), which are never run.

A ``::`` literal block whose text is Python must be a ``.. code-block:: python`` (shell commands
and other text use ``code-block:: sh`` / ``text`` or stay ``::``): see
:func:`test_no_python_in_literal_blocks`.
"""

from __future__ import annotations

import ast
import gc
import os
import re
import sys
import traceback
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

PYTHON_LANGUAGES = {"python", "python3", "py"}
NO_RUN = "no-run"

# What a block must contain for its page to need a server.
PG_MARKERS = ("psycopg", "postgresql://", "postgres://")
MYSQL_MARKERS = ("pymysql", "MySQLdb", "mysql://")
PG_DSN = "host=127.0.0.1 dbname=test user=postgres"  # as the docs write it
MYSQL_ARGS = {"host": "127.0.0.1", "user": "root", "database": "test"}

_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\.[ \t]+(?P<name>[\w-]+)::[ \t]*(?P<arg>.*)$")
_OPTION = re.compile(r"^:(?P<name>[\w-]+):[ \t]*(?P<value>.*)$")


@dataclass(frozen=True)
class Block:
    """One code block of a page: ``line`` is the 1-based line of its first line of code."""

    path: Path
    line: int
    language: str
    classes: frozenset[str]
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in PYTHON_LANGUAGES and NO_RUN not in self.classes


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _body(lines: list[str], start: int, parent_indent: int) -> tuple[int, list[str]]:
    """The indented body after line ``start - 1``: its first index and its lines (dedented,
    trailing blank lines dropped).  The body ends at the first non-blank line indented no more
    than ``parent_indent``."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > parent_indent):
        end += 1
    body = lines[start:end]
    while body and not body[-1].strip():
        body.pop()
    first = start
    while body and not body[0].strip():
        body.pop(0)
        first += 1
    margin = min((_indent(line) for line in body if line.strip()), default=0)
    return first, [line[margin:] for line in body]


def code_blocks(path: Path) -> list[Block]:
    """The ``code-block`` directives of an rst file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for index, line in enumerate(lines):
        match = _DIRECTIVE.match(line)
        if not match or match["name"] not in ("code-block", "code", "sourcecode"):
            continue
        parent = _indent(line)
        first, body = _body(lines, index + 1, parent)
        classes: set[str] = set()
        # Options follow the directive's line at once, before a blank line.
        options_end = index + 1  # the index just past the options read so far
        while body and first == options_end and _OPTION.match(body[0]):
            option = _OPTION.match(body[0])
            assert option is not None
            if option["name"] == "class":
                classes.update(option["value"].split())
            body.pop(0)
            options_end += 1
            first += 1
        while body and not body[0].strip():
            body.pop(0)
            first += 1
        language = (match["arg"].strip() or "default").lower()
        blocks.append(Block(path, first + 1, language, frozenset(classes), "\n".join(body) + "\n"))
    return blocks


def literal_blocks(path: Path) -> list[Block]:
    """The ``::`` literal blocks of an rst file (a paragraph ending in ``::``)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for index, line in enumerate(lines):
        text = line.rstrip()
        if not text.endswith("::") or _DIRECTIVE.match(line) or text.lstrip().startswith(".."):
            continue
        first, body = _body(lines, index + 1, _indent(line))
        if body:
            blocks.append(Block(path, first + 1, "literal", frozenset(), "\n".join(body) + "\n"))
    return blocks


def doc_pages() -> list[Path]:
    pages = [ROOT / "README.rst"]
    pages += sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.relative_to(DOCS).parts)
    return [p for p in pages if p.exists()]


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- servers -----------------------------------------------------------------------------------


def _needs(blocks: list[Block], markers: tuple[str, ...]) -> bool:
    return any(marker in block.code for block in blocks if block.runs for marker in markers)


@pytest.fixture
def pg_schema(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A schema of its own for the page's PostgreSQL sessions (their ``search_path``)."""
    from tests.conftest import unavailable

    try:
        import psycopg
    except ImportError as exc:
        unavailable(f"psycopg is not installed: {exc}")
    schema = f"dbpool_docs_{os.getpid()}"
    try:
        admin = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        unavailable(f"PostgreSQL ({PG_DSN}), which the page uses, is not reachable: {exc}")
    with admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.execute(f"CREATE SCHEMA {schema}")
        options = os.environ.get("PGOPTIONS", "")
        monkeypatch.setenv("PGOPTIONS", f"{options} -c search_path={schema}".strip())
        try:
            yield schema
        finally:
            admin.execute("SET lock_timeout = '10s'")
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _require_mysql() -> None:
    from tests.conftest import unavailable

    try:
        import pymysql
    except ImportError as exc:
        unavailable(f"PyMySQL is not installed: {exc}")
    try:
        pymysql.connect(**MYSQL_ARGS, connect_timeout=5).close()
    except pymysql.Error as exc:
        unavailable(f"MariaDB (root@127.0.0.1/test), which the page uses, is not reachable: {exc}")


# -- running a page ----------------------------------------------------------------------------


def _open_pools() -> list[Any]:
    import dbpool

    return [o for o in gc.get_objects() if isinstance(o, dbpool.Pool) and not o.closed]


def _doc_traceback(exc: BaseException) -> str:
    """The exception with its traceback from the page's own frame on (the runner's frame, the
    first one, left out), chained exceptions included."""
    if exc.__traceback__ is not None:
        exc = exc.with_traceback(exc.__traceback__.tb_next)
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def run_page(path: Path, blocks: list[Block]) -> None:
    namespace: dict[str, Any] = {"__name__": f"docs_{path.stem}", "__file__": str(path)}
    pools_before = weakref.WeakSet(_open_pools())
    problems: list[str] = []
    failure = ""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for block in blocks:
                if not block.runs:
                    continue
                # Padded so that tracebacks give the line numbers of the .rst file.
                code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
                try:
                    exec(code, namespace)
                except Exception as exc:
                    failure = f"{block.where}: the block raised\n{_doc_traceback(exc)}"
                finally:
                    gc.collect()
                    problems += [
                        f"{block.where}: after this block, {w.category.__name__}: {w.message}"
                        for w in caught
                        if issubclass(w.category, ResourceWarning)
                    ]
                    caught.clear()
                if failure or problems:
                    break
    finally:
        # Close what the page left open before letting go of it (dropping an open pool warns).
        for pool in _open_pools():
            if pool not in pools_before:
                pool.close(timeout=5.0)
        namespace.clear()
        gc.collect()
    if failure:
        pytest.fail(failure, pytrace=False)
    if problems:
        pytest.fail(
            "the page dropped something without closing it (close pools, leases and cursors "
            "in the example):\n  " + "\n  ".join(problems),
            pytrace=False,
        )


PAGES = doc_pages()
# Pages with Python to run; the others have nothing for test_page_blocks_run to do.
PAGES_WITH_CODE = [path for path in PAGES if any(block.runs for block in code_blocks(path))]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("path", PAGES_WITH_CODE, ids=_page_id)
def test_page_blocks_run(
    path: Path, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = code_blocks(path)
    if _needs(blocks, PG_MARKERS):
        request.getfixturevalue("pg_schema")
    if _needs(blocks, MYSQL_MARKERS):
        _require_mysql()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(path)])
    run_page(path, blocks)


@pytest.mark.parametrize("path", PAGES, ids=_page_id)
def test_blocks_not_run_still_compile(path: Path) -> None:
    """A ``no-run`` block is shown for reading, and still has to be valid Python."""
    for block in code_blocks(path):
        if block.language in PYTHON_LANGUAGES and not block.runs:
            try:
                compile(block.code, block.where, "exec")
            except SyntaxError as exc:
                pytest.fail(f"{block.where}: a no-run block is not valid Python: {exc}")


@pytest.mark.parametrize("path", PAGES, ids=_page_id)
def test_no_python_in_literal_blocks(path: Path) -> None:
    """Python shown in a ``::`` block would never run: it belongs in a code-block."""
    for block in literal_blocks(path):
        try:
            tree = ast.parse(block.code)
        except SyntaxError:
            continue  # shell commands, synopses, trees: not Python
        if any(not isinstance(node, ast.Expr) for node in tree.body):
            pytest.fail(
                f"{block.where}: this '::' block is Python; make it a "
                "'.. code-block:: python' so that the test suite runs it"
            )


# -- the parser itself -------------------------------------------------------------------------


def test_parser_reads_options_classes_and_line_numbers(tmp_path: Path) -> None:
    page = tmp_path / "page.rst"
    page.write_text(
        "Title\n"  # 1
        "=====\n"  # 2
        "\n"  # 3
        ".. code-block:: python\n"  # 4
        "\n"  # 5
        "   x = 1\n"  # 6
        "\n"  # 7
        "   y = x\n"  # 8
        "\n"  # 9
        "Text::\n"  # 10
        "\n"  # 11
        "   import os\n"  # 12
        "\n"  # 13
        ".. note::\n"  # 14
        "\n"  # 15
        "   .. code-block:: python\n"  # 16
        "      :class: no-run other\n"  # 17
        "      :caption: A caption\n"  # 18
        "\n"  # 19
        "      raise SystemExit\n"  # 20
        "\n"  # 21
        "Back to text.\n"  # 22
        ".. code-block:: sh\n"  # 23
        "\n"  # 24
        "   make test\n",  # 25
        encoding="utf-8",
    )
    blocks = code_blocks(page)
    assert [(b.line, b.language, b.code) for b in blocks] == [
        (6, "python", "x = 1\n\ny = x\n"),
        (20, "python", "raise SystemExit\n"),
        (25, "sh", "make test\n"),
    ]
    assert blocks[1].classes == {"no-run", "other"}
    assert [b.runs for b in blocks] == [True, False, False]
    assert [(b.line, b.code) for b in literal_blocks(page)] == [(12, "import os\n")]
