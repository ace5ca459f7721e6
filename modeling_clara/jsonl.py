"""JSONL files: reading with `file:line` errors, atomic writes, and append-and-resume output.

Training data, evaluation data and corpora are read with [`read_jsonl`]. Long runs (evaluation predictions, synthesised
rows and their progress file) append with [`append_jsonl`], which syncs every batch to disk, so a kill loses at most
the line being written; [`read_for_resume`] reads such a file back and cuts that line off, and
[`read_complete_records`] reads one that another process may still be writing. A run records its settings with
[`record_settings`] so that a resumed run with other settings is refused. Small files that must never be seen half
written (a run's settings, evaluation summaries) go through [`write_text_atomic`].
"""

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from transformers.utils import logging

logger = logging.get_logger(__name__)


class ClaraDataError(ValueError):
    """A file that does not hold the expected format; the message names file and line."""


def parse_json_object(line: str, where: str) -> dict:
    """One JSONL line as a dict; anything else is a `ClaraDataError` naming `where` (file:line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ClaraDataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ClaraDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """`(line number, object)` for each non-blank line, the first `limit` of them (lines after those are not read,
    so a bad one there is no error); a line that is not a JSON object is a `ClaraDataError` naming `path:line`."""
    if limit is not None and limit < 1:
        return
    n_read = 0
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                yield line_number, parse_json_object(line, f"{path}:{line_number}")
                n_read += 1
                if n_read == limit:
                    return


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old content or the new one, never a part (even after a crash)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def record_settings(path: Path, settings: dict, conflict: str, advice: str) -> None:
    """Store a run's settings at `path`, or check them against those a previous run stored there.

    Raises:
        `ValueError`: `conflict` (what differs from what), the differing keys and values, then `advice` (what to do).
    """
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(key for key in previous.keys() | settings.keys() if previous.get(key) != settings.get(key))
        if changed:
            raise ValueError(
                f"{conflict} (differs in {changed}: {[previous.get(c) for c in changed]} before, "
                f"{[settings.get(c) for c in changed]} now); {advice}"
            )
        return
    write_text_atomic(path, json.dumps(settings, indent=2) + "\n")


def read_for_resume(path: Path) -> list[dict]:
    """The objects of a file written by [`append_jsonl`], in order; none when it does not exist yet.

    A last line without its newline is what a kill in the middle of a write leaves: it is cut off the file (logged),
    so its record is written again, whole, by the resumed run.
    """
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) < len(raw):
        logger.warning(f"{path}: dropping an incomplete last line (an interrupted write)")
        os.truncate(path, len(complete))
    return _parse_lines(complete, path)


def read_complete_records(path: Path) -> list[dict]:
    """The objects of the complete lines of a file written by [`append_jsonl`], leaving the file as it is: another
    process may be appending to it, so a last line without its newline is still being written."""
    raw = path.read_bytes()
    return _parse_lines(raw[: raw.rfind(b"\n") + 1], path)


def _parse_lines(complete: bytes, path: Path) -> list[dict]:
    lines = complete.decode("utf-8").splitlines()
    return [parse_json_object(line, f"{path}:{n}") for n, line in enumerate(lines, start=1) if line.strip()]


def append_jsonl(file: BinaryIO, records: list[dict]) -> int:
    """Append records as lines to a file opened with `"ab"`, then flush and sync it to disk.

    Returns:
        `int`: the file's size after the write, where a resumed run may cut it back to.
    """
    for record in records:
        file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    file.flush()
    os.fsync(file.fileno())
    return file.tell()


__all__ = [
    "ClaraDataError", "append_jsonl", "parse_json_object", "read_complete_records", "read_for_resume", "read_jsonl",
    "record_settings", "write_text_atomic",
]
