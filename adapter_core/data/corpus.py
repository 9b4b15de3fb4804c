"""Generic English text for the self-supervised objectives, from what every Python install has.

Source: the Python standard library of the running interpreter: the language reference topics
in `pydoc_data.topics` and the docstrings of the standard library's modules, classes and
functions. Licence: Python Software Foundation License 2.0. Nothing is downloaded; the text is
the same on every machine with the same Python version. See docs/training-data.md.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
from pathlib import Path

TRAIN, EVAL = "train", "eval"
_HELDOUT_EVERY = 20  # one document in 20 is kept for held-out perplexity
_MIN_CHARS = 300
# Test suites and vendored code are not prose; idlelib and turtledemo are mostly GUI strings.
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "idlelib", "turtledemo", "__pycache__"}


def _is_heldout(doc_id: str) -> bool:
    return hashlib.sha256(doc_id.encode()).digest()[0] % _HELDOUT_EVERY == 0


def _reference_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics
    return [(f"pydoc:{name}", topics[name]) for name in sorted(topics)]


def _docstrings() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if _SKIP_PARTS & set(relative.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            text = ast.get_docstring(node)
            if text and len(text) >= _MIN_CHARS:
                name = getattr(node, "name", "<module>")
                docs.append((f"stdlib:{relative}:{name}:{getattr(node, 'lineno', 0)}", text))
    return docs


@functools.lru_cache(maxsize=1)
def _all_documents() -> tuple[tuple[str, str], ...]:
    # parsing the standard library takes seconds, hence the cache
    return tuple((doc_id, text) for doc_id, text in _reference_topics() + _docstrings() if len(text) >= _MIN_CHARS)


def documents(split: str) -> list[str]:
    """All documents of one split, in a fixed order."""
    if split not in (TRAIN, EVAL):
        raise ValueError(f"split must be {TRAIN!r} or {EVAL!r}")
    want = split == EVAL
    return [text for doc_id, text in _all_documents() if _is_heldout(doc_id) == want]
