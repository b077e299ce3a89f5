"""Reading JSON-lines files (one JSON value per line), with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """``(line number, value)`` for every non-blank line of ``path``, numbered from 1.

    Raises ``ValueError`` naming ``path:line`` and the start of the line when it is not valid JSON.
    """
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number} is not valid JSON ({error.msg} at column {error.colno}): {line.strip()[:120]!r}"
                ) from error
