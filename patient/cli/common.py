"""Shared helpers for the command-line tools: data specs, error reporting, exit codes."""

from __future__ import annotations

import sys


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


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError, KeyError)
