"""Helpers shared by the benchmarks: machine facts, timing, and the closing JSON line."""

from __future__ import annotations

import json
import os
import platform
import statistics
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


def header(command: str, seconds: float, what: str) -> list[str]:
    """The lines every committed result starts with: command, date, machine, run time, what was measured."""
    m = machine()
    return [f"command: {command}", f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"machine: {m['cpu']}, {m['cores']} cores", f"run time: {seconds:.0f} s", what, ""]


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


def report(lines: list[str], errors: dict, save: str | None) -> None:
    """Append failed children, print, and write to `save` when given (the JSON line must already be last)."""
    body, last = lines[:-1], lines[-1]
    body += [f"{name} failed: {r['error']}" for name, r in errors.items() if "error" in r]
    text = "\n".join(body + [last])
    print(text)
    if save:
        from pathlib import Path

        Path(save).write_text(text + "\n")
