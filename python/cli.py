"""What ``lpa-train`` and ``lpa-bench`` share: one-line usage errors and writing result files."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import BinaryIO, Callable, NoReturn


# --threads: more than a few per core only slows a run down, and torch's set_num_threads crashes (SIGSEGV)
# for absurd counts
MAX_THREADS = 4 * (os.cpu_count() or 1)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors, its own and those the programs find later with
    ``parser.error``, are one line on stderr and exit status 2 (argparse would print the whole usage,
    which for these programs is a screenful that hides the message)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind: type, minimum: float, strict: bool = False, maximum: float | None = None):
    """An argparse ``type``: a finite ``kind`` (int or float) >= ``minimum`` (> with ``strict``), and at most
    ``maximum`` when given."""
    rule = f"{'>' if strict else '>='} {minimum:g}" + ("" if maximum is None else f" and <= {maximum:g}")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        above = value > minimum if strict else value >= minimum
        if not (above and math.isfinite(value) and (maximum is None or value <= maximum)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` with ``write(file)`` through a temporary file in the same folder, flushed to disk,
    and a rename, so a run cut short leaves the last complete file, never half of one. The file gets
    the usual permissions (0666 less the umask, 0644 by default): a temporary-file helper would leave it 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """``write_atomically`` of ``text`` (UTF-8)."""
    write_atomically(path, lambda f: f.write(text.encode()))


def write_json_atomically(path: str | Path, data: object) -> None:
    """``data`` as indented JSON (NaN allowed; objects JSON cannot hold, such as a dtype, as ``str``)."""
    write_text_atomically(path, json.dumps(data, indent=1, allow_nan=True, default=str) + "\n")


def write_or_exit(parser: argparse.ArgumentParser, option: str, path: str | Path, write: Callable[[], object]) -> None:
    """``write()``, which writes ``path`` (given by ``option``); what ``check_writable`` could not foresee (a
    full disk, a file system gone read-only) is one ``parser.error`` line, exit 2, instead of a traceback
    (whatever was written before stays)."""
    try:
        write()
    except OSError as exc:
        parser.error(f"argument {option}: cannot write {path}: {exc.strerror or exc}")


def check_writable(path: str | Path) -> str:
    """Why ``path`` cannot be written as an output file ("" when it can), checked before a long run."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder, not a file name"
    folder = next((p for p in path.absolute().parents if p.exists()), None)
    if folder is None or not folder.is_dir():
        return f"cannot create the folder {path.parent}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"no permission to write in {folder}"
    return ""
