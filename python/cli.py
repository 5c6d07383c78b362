"""What ``lpa-train`` and ``lpa-bench`` share: one-line usage errors and writing result files."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import threading
from pathlib import Path
from typing import BinaryIO, Callable, NoReturn


# --threads: more than a few per core only slows a run down, and torch's set_num_threads crashes (SIGSEGV)
# for absurd counts
MAX_THREADS = 4 * (os.cpu_count() or 1)


def launched_rank() -> int:
    """This process's rank among those torchrun started (its ``RANK``); 0 for the only one."""
    return int(os.environ.get("RANK", "0"))


def main_process() -> bool:
    """Whether this process prints: the only one, or rank 0 of those torchrun started."""
    return launched_rank() == 0


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors, its own and those the programs find later with
    ``parser.error``, are one line on stderr and exit status 2 (argparse would print the whole usage,
    which for these programs is a screenful that hides the message). Under torchrun each rank prints its
    own line, the ranks other than 0 naming themselves: a check one rank alone fails (its data folder, say)
    must not exit silently, so a mistake every rank finds is printed once per rank."""

    def error(self, message: str) -> NoReturn:
        # one line whatever the message holds (a library's message may span several)
        line = " ".join(part.strip() for part in message.splitlines() if part.strip())
        who = self.prog if main_process() else f"{self.prog} (rank {launched_rank()})"
        self.exit(2, f"{who}: error: {line} (see {self.prog} --help)\n")


def number(kind: type, minimum: float, strict: bool = False, maximum: float | None = None):
    """An argparse ``type``: a finite ``kind`` (int or float) >= ``minimum`` (> with ``strict``), and at most
    ``maximum`` when given."""
    shown = str if kind is int else (lambda bound: f"{bound:g}")  # an int bound in full (2^63 - 1, not 9.2e+18)
    rule = f"{'>' if strict else '>='} {shown(minimum)}" + ("" if maximum is None else f" and <= {shown(maximum)}")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        above = value > minimum if strict else value >= minimum
        finite = kind is int or math.isfinite(value)  # (math.isfinite of an int beyond 1e308 raises)
        if not (above and finite and (maximum is None or value <= maximum)):
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


class Terminated(BaseException):
    """SIGTERM (what job schedulers and torchrun send to stop a job) inside ``sigterm_stops``: raised in the
    main thread as Ctrl-C raises ``KeyboardInterrupt``, so that both stop a run the same way (a file being
    written is removed, the results written so far stay, ``--json``'s ``finished`` stays false)."""


@contextlib.contextmanager
def sigterm_stops():
    """A block in which SIGTERM raises ``Terminated`` (once: a second SIGTERM while the first unwinds is
    ignored, so that the clean-up is not cut short). Only the main thread can set a signal handler: in
    another one the block runs with SIGTERM's handling unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    if not str(path):  # (Path("") is the current folder)
        return "the file name is empty"
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder, not a file name"
    folder = next((p for p in path.absolute().parents if p.exists()), None)
    if folder is None or not folder.is_dir():
        return f"cannot create the folder {path.parent}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"no permission to write in {folder}"
    return ""
