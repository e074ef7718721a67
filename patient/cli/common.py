"""Shared helpers for the command-line tools: data specs, error reporting, exit codes."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def data_source(spec: str, split: str):
    """`digits`, `fashion_mnist` or `image_folder:PATH` -> a patient.data source for `split` ("train"/"test")."""
    from patient import data

    if spec == "digits":
        return data.digits(split)
    if spec == "fashion_mnist":
        return data.fashion_mnist(split)
    if spec.startswith("image_folder:"):
        return data.image_folder(spec.split(":", 1)[1])
    raise ValueError(f"--data {spec!r}: use digits, fashion_mnist or image_folder:PATH")


def fail(prog: str, err: BaseException) -> int:
    """Print one clear line for a user error and return the exit code."""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def check_output(path: str, flag: str = "--out") -> None:
    """Fail before any work when `path` cannot be written: its directory is missing, not a directory, or not
    writable, or the path itself is a directory."""
    p = Path(path)
    parent = p.parent  # Path("x.eqx").parent is Path(".")
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path such as {p / 'model.eqx'}")
    if not parent.exists():
        raise ValueError(f"{flag} {path}: directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: directory {parent} is not writable")


# Mistakes a user can make (bad values, missing or unwritable files, a run that diverged) end in one line; anything
# else (TypeError, KeyError, ...) is a bug in patient and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
