"""The command-line kit every `patient-*` tool is built from: the argument parser, error reporting and exit codes,
the JSON result line, the data specs and the shared steps of the two training commands.

Conventions, the same in every tool:
- A user's mistake (bad value, missing or unwritable file, unknown data, a run that diverged) prints ONE line,
  `<prog>: error: <what is wrong and how to fix it>`, on stderr and exits 2 (1 for a failed export verification, 3
  when another process of a multi-host run died).
  Anything else (TypeError, KeyError, ...) is a bug in patient and keeps its traceback.
- Results end with one JSON line on stdout; `--json PATH` also writes it to a file (atomically).
- Importing this module needs the standard library only, so `patient-bench` and `patient-eval` run without JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from patient.engine import Config, DistillResult

# Mistakes a user can make end in one line; ModelError, DataError, ExportError, ConfigError, PatientFileError and
# WeightsError are ValueErrors, a diverged run raises NonFiniteLossError (a FloatingPointError).
USER_ERRORS = (ValueError, OSError, FloatingPointError)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def fail(prog: str, err: BaseException | str) -> int:
    """Print one clear line for a user error and return the exit code: `err.exit_code` if it has one, else 2."""
    text = str(err).strip()
    msg = text.splitlines()[0] if text else type(err).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return int(getattr(err, "exit_code", 2))


def run(prog: str, work: Callable[[], int]) -> int:
    """`work()`, with user errors turned into one line and an exit code (see the module docstring). Ctrl-C and
    SIGTERM end in one line and exit 130 / 143 (checkpoints already written stay; a rerun resumes); running out of
    memory (numpy's MemoryError, XLA's RESOURCE_EXHAUSTED) is one line naming the way out."""
    import signal

    def terminate(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminate) if _main_thread() else None
    try:
        return work()
    except USER_ERRORS as e:
        return fail(prog, e)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; files already written are complete (a --workdir run resumes from its last "
              "checkpoint)", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{prog}: terminated (SIGTERM); a --workdir run resumes from its last checkpoint", file=sys.stderr)
        return 143
    except MemoryError as e:
        return fail(prog, f"out of memory ({str(e).strip() or 'MemoryError'}); lower the batch size or resolution")
    except Exception as e:  # noqa: BLE001  (XLA's allocation failure, a lost peer; anything else keeps its traceback)
        if type(e).__name__ == "PeerLostError":
            # Leave at once: JAX's exit handler would wait for the dead peer at its shutdown barrier until the
            # heartbeat timeout, then abort with a page of coordination-service logs.
            fail(prog, e)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
        if type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and (
                "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e)):
            first = str(e).strip().splitlines()[0][:200]
            return fail(prog, f"the device ran out of memory ({first}); lower the batch size or resolution")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so `finally` blocks (checkpoint managers, temp files) run."""


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def emit_json(result: dict, path: str | None = None) -> str:
    """Print `result` as one sorted JSON line; also write it to `path` when given. Returns the line."""
    line = json.dumps(result, sort_keys=True, default=str)
    if path:
        from patient._files import write_atomic

        write_atomic(path, line + "\n")
    print(line)
    return line


def check_output(path: str, flag: str = "--out") -> None:
    """Fail before any work when `path` cannot be written: its directory is missing, not a directory, or not
    writable, or the path itself is a directory."""
    p = Path(path)
    parent = p.parent  # Path("x.eqx").parent is Path(".")
    if p.is_symlink():
        raise ValueError(f"{flag} {path} is a symbolic link; files are written in place of links, never through "
                         f"them: give the real path ({p.resolve()}) or remove the link")
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path such as {p / 'model.eqx'}")
    if not parent.exists():
        raise ValueError(f"{flag} {path}: directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is not a directory")
    # A real probe: permission bits say nothing about read-only mounts or /proc (and root passes every os.access).
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.probe.", dir=parent)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create files in {parent} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


# ------------------------------------------------------------------------------------------------- training commands


def add_training_args(p: argparse.ArgumentParser, *, data_default: str | None) -> None:
    """The arguments `patient-train` and `patient-distill` share."""
    p.add_argument("--config", help="TOML config (keys of patient.engine.Config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--data", default=data_default, help="training data: digits | fashion_mnist | image_folder:PATH")
    p.add_argument("--eval-data", help="labelled evaluation data (the test split of digits / fashion_mnist)")
    p.add_argument("--workdir", help="checkpoints, history and TensorBoard events; a rerun resumes from here")
    hosts = p.add_argument_group("several hosts (run the same command on every process)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, where it listens")
    hosts.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the run")
    hosts.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1")
    hosts.add_argument("--cluster", action="store_true",
                       help="join the cluster JAX detects itself (TPU slice, SLURM, Open MPI) instead")


def training_inputs(args: argparse.Namespace) -> tuple:
    """`(config, data, eval_data)` from the shared arguments, every check done before any training starts."""
    from patient.engine import Config, load_config
    from patient.engine.config import parse_set
    from patient.engine.hosts import check_hosts, join_hosts
    from patient.runtime.data import open_source

    check_hosts(args.coordinator, args.num_processes, args.process_id)
    if args.cluster and args.coordinator:
        raise ValueError("give either --cluster or --coordinator/--num-processes/--process-id, not both")
    check_output(args.out)
    overrides = parse_set(args.set)
    cfg = load_config(args.config, **overrides) if args.config else Config().replace(**overrides)
    if not args.data:
        raise ValueError("--data is required: digits, fashion_mnist or image_folder:PATH")
    data = open_source(args.data, "train")  # the one data-spec parser, shared with the JAX-free device path
    eval_data = open_source(args.eval_data, "test") if args.eval_data else None
    join_hosts(args.coordinator, args.num_processes, args.process_id, auto=args.cluster)  # before JAX touches a device
    return cfg, data, eval_data


def save_result(out: str, result: DistillResult, cfg: Config, class_names: list[str] | None,
                seconds: float) -> None:
    """Write the trained model of a `DistillResult` with its config and metrics, and say so."""
    from patient.engine.teachers import is_writer
    from patient.io import save

    if is_writer():  # on several hosts every process ran the same training; process 0 alone writes the file
        save(out, result.student, result.state, class_names=class_names,
             meta={"config": cfg.to_toml(), "metrics": result.metrics})
        print(f"wrote {out} ({seconds:.0f} s)")
