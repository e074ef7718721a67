"""Helpers shared by the benchmarks: machine facts, timing, and the closing JSON line."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()}


LOAD_LIMIT = 1.0  # a speed result taken with more than this much load from elsewhere on 2 cores is not kept


class Quiet:
    """Load guard for speed benchmarks: `with Quiet() as q: ...`, then `q.valid`, `q.describe()`, `q.figures()`.

    Before: waits up to `wait` seconds for the 1-minute load average to drop below `limit` and records it.
    During: samples, once a second, how many threads of OTHER processes are runnable (state R in /proc): the load
    someone else put on the machine while this benchmark ran (the 1-minute average after a run mostly measures the
    benchmark's own threads, so it cannot tell a quiet run from a shared one). After: the 1-minute average again.
    A run is valid when the load before is <= `limit` and other processes kept on average at most `foreign_limit`
    threads runnable during it (half a core of 2 by default: one busy foreign thread fails it).
    """

    def __init__(self, limit: float = LOAD_LIMIT, foreign_limit: float = 0.5, wait: float = 240.0):
        self.limit, self.foreign_limit, self.wait = limit, foreign_limit, wait
        self.before = self.after = None
        self.samples: list[int] = []
        self._stop = threading.Event()

    def __enter__(self):
        deadline = time.monotonic() + self.wait
        while os.getloadavg()[0] > self.limit and time.monotonic() < deadline:
            time.sleep(5)
        self.before = os.getloadavg()[0]
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.after = os.getloadavg()[0]
        return False

    def _sample(self):
        while not self._stop.wait(1.0):
            self.samples.append(_foreign_runnable(os.getpid()))

    @property
    def foreign(self) -> float:
        return statistics.mean(self.samples) if self.samples else 0.0

    @property
    def valid(self) -> bool:
        return self.before is not None and self.before <= self.limit and self.foreign <= self.foreign_limit

    def describe(self) -> str:
        return (f"load: 1-min average {self.before:.2f} before, {self.after:.2f} after (the latter includes this "
                f"benchmark's own threads); other processes' runnable threads during the run: mean "
                f"{self.foreign:.2f}, max {max(self.samples, default=0)} -> "
                f"{'quiet' if self.valid else f'NOT QUIET (limits {self.limit} before, {self.foreign_limit} during)'}")

    def figures(self) -> dict:
        return {"load_before": round(self.before, 2), "load_after": round(self.after, 2),
                "foreign_runnable_mean": round(self.foreign, 2), "quiet": self.valid}


def _foreign_runnable(root: int) -> int:
    """Runnable threads on the machine outside `root` and its descendants."""
    parent, states = {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent[int(pid)] = int(fields[1])
            running = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    running += f.read().rsplit(")", 1)[1].split()[0] == "R"
            states[int(pid)] = running
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    mine = {root}
    changed = True
    while changed:
        changed = False
        for pid, pp in parent.items():
            if pp in mine and pid not in mine:
                mine.add(pid)
                changed = True
    return sum(n for pid, n in states.items() if pid not in mine)


def study_args(doc: str, full: dict, quick: dict, argv, *, quick_help: str, extra=None):
    """Parse a study's command line: --quick, one flag per setting (default: `full`, or `quick` with --quick),
    --progress, and whatever `extra(parser)` adds. Returns (parser, args) with every setting filled in."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    for k, v in full.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"(full: {v}, quick: {quick[k]})")
    p.add_argument("--progress", action="store_true", help="a progress bar for every run")
    if extra is not None:
        extra(p)
    a = p.parse_args(argv)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return p, a


def cached_teacher(path, name: str, *, res: int, steps: int, log, log_every: int = 50, progress: bool = False):
    """A Fashion-MNIST teacher: `name` trained with `patient.train` on all 60000 training images (mode `same/rc`, Adam
    3e-3, batch 128, `steps` steps), saved to `path` as .eqx, or read back from there. Returns ((model, state), info)
    with info `test_top1`, `train_s`, `steps`, `res` and `cached`."""
    from pathlib import Path

    import jax

    import patient
    from patient.data import fashion_mnist
    from patient.models import create

    path = Path(path)
    if path.is_file():
        model, state, header = patient.load(path)
        info = dict(header["meta"], cached=True)
        log(f"teacher: {path} (cached; it trained in {info['train_s']:.0f} s)")
    else:
        t0 = time.perf_counter()
        teacher = create(name, num_classes=10, key=jax.random.key(0), resolution=res)
        r = patient.train(teacher, fashion_mnist("train"), eval_data=fashion_mnist("test"), mode="same/rc",
                          steps=steps, batch_size=128, learning_rate=3e-3, log_every=log_every, progress=progress)
        model, state = r.student, r.state
        info = dict(test_top1=r.metrics["top1"], train_s=round(time.perf_counter() - t0, 1), steps=steps, res=res)
        path.parent.mkdir(parents=True, exist_ok=True)
        patient.save(path, model, state, meta=info)
        info["cached"] = False
        log(f"teacher: trained in {info['train_s']:.0f} s, saved to {path}")
    log(f"teacher: {name} at {res} px, {steps} steps (same/rc, Adam 3e-3, batch 128) on all 60000 training images; "
        f"test top-1 {info['test_top1']:.2f}%")
    return (model, state), info


def teacher_note(tinfo) -> str:
    """The run-time line's remark on where the teacher came from."""
    if tinfo["cached"]:
        return f"; teacher loaded from cache, it trained in {tinfo['train_s']} s"
    return "; teacher trained in this run"


def time_call(fn, *, warmup: int, runs: int) -> list[float]:
    """Seconds per call of `fn` (which must block until its work is done), warm-up excluded."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_children(children: dict, rounds: int) -> dict:
    """Run each child process `rounds` times, rotating the order every round, and return {name: result}: the
    median over rounds of every number in the children's JSON results (the last line of their stdout).

    `children` maps a name to `(argv, env)`. Two frameworks measured in separate processes one after the other see
    different moments of a shared machine (the same process measured twice in a row moved by 20-40% on this one);
    alternating them over rounds and taking medians pairs them in time. A child that fails in any round is reported
    as {"error": its last stderr line}."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1")
    names = list(children)
    runs: dict[str, list] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            argv, env = children[name]
            p = subprocess.run(argv, capture_output=True, text=True, env=env)
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {
                "error": (p.stderr.strip().splitlines() or ["failed"])[-1][:160]})
    out = {}
    for name, results in runs.items():
        failed = [r for r in results if "error" in r]
        out[name] = failed[0] if failed else _median_tree(results)
    return out


def _median_tree(trees: list):
    """The element-wise median of equally shaped JSON trees (numbers are medians, other leaves from the first)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _median_tree([t[k] for t in trees]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(trees)
    return first


def median(xs) -> float:
    return statistics.median(xs)


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    """Render `rows` as a fixed-width text table; `cols` is [(key, header)]."""
    cells = [[h for _, h in cols]] + [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def json_line(name: str, **figures) -> str:
    return json.dumps({"benchmark": name, **machine(), **figures})


def header(command: str, seconds: float, what: str, quiet: Quiet | None = None) -> list[str]:
    """The lines every committed result starts with: command, date, machine, run time, load, what was measured."""
    m = machine()
    return [f"command: {command}", f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"machine: {m['cpu']}, {m['cores']} cores", f"run time: {seconds:.0f} s"]  + (
        [quiet.describe()] if quiet else []) + [what, ""]


class Printer(list):
    """Prints each line it is called with and keeps it, for `save_with_header`: `lines = log = Printer()`."""

    def __call__(self, s: str = "") -> None:
        print(s, flush=True)
        self.append(s)


def save_with_header(path, lines: list[str], *, run_time: float, load: float, modules, note: str = "",
                     shared: bool = True) -> None:
    """Write `lines` to `path` under the header the optimizer/method benchmarks use: command, date, machine,
    software versions of `modules`, run time with the load average at start (and `note`)."""
    import shlex
    import sys
    from pathlib import Path

    header = [
        f"command: python {shlex.join(sys.argv)}",
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        f"machine: {cpu_model()}, {os.cpu_count()} cores{' (shared with other jobs)' if shared else ''}, "
        f"{platform.system()} {platform.release()}",
        f"software: python {platform.python_version()}, " + ", ".join(f"{m.__name__} {m.__version__}" for m in modules),
        f"run time: {run_time:.1f} s (1-min load average at start: {load:.2f}{note})",
        "",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + lines) + "\n")


def report(lines: list[str], errors: dict, save: str | None, quiet: Quiet | None = None) -> None:
    """Append failed children, print, and write to `save` when given (the JSON line must already be last).

    A speed result measured on a machine that was not quiet is printed but never written: exit status 3."""
    body, last = lines[:-1], lines[-1]
    body += [f"{name} failed: {r['error']}" for name, r in errors.items() if "error" in r]
    text = "\n".join(body + [last])
    print(text)
    if quiet is not None and not quiet.valid:
        print(f"NOT SAVED: the machine was not quiet ({quiet.describe()}); stop other jobs and rerun.",
              file=sys.stderr)
        sys.exit(3)
    if save:
        from pathlib import Path

        Path(save).write_text(text + "\n")
