"""Several hosts: join a multi-process JAX run before anything else touches a device.

Every process runs the same program (the same `distill(...)` call or the same `patient-distill` command); the
trainer then builds one mesh over every device of every process, each process reads its block of every global batch,
and process 0 alone writes files. `join_hosts` is the one call that makes a process part of such a run:

- with `coordinator="HOST:PORT"`, `num_processes` and `process_id`: an explicit cluster (GPU hosts, CPU hosts, or
  several processes on one machine over loopback);
- with `auto=True`: the cluster JAX detects itself (a TPU slice, SLURM, Open MPI).

On CPU the collectives run over gloo (TCP). A peer that dies is noticed by the coordination service's heartbeat
(`heartbeat_timeout` seconds), which ends the surviving processes instead of letting them wait forever.
"""

from __future__ import annotations

import re

_ADDRESS = re.compile(r"^(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")


def check_hosts(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Raise ValueError (one line) unless the three values describe a cluster: all given or none, a HOST:PORT with a
    port in 1..65535, `num_processes >= 1` and `0 <= process_id < num_processes`."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("a multi-host run needs all three of --coordinator HOST:PORT, --num-processes N and "
                         "--process-id I (the same coordinator and N on every process, I = 0 .. N-1)")
    if not any(given):
        return
    m = _ADDRESS.match(str(coordinator))
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise ValueError(f"--coordinator {coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:1234 or localhost:1234; "
                         "process 0 listens on that port)")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"--num-processes {num_processes!r} must be an integer >= 1")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id!r} must be an integer in 0 .. {num_processes - 1} "
                         f"(one per process, {num_processes} processes)")


def join_hosts(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
               auto: bool = False, timeout: int = 300, heartbeat_timeout: int = 100) -> bool:
    """Make this process part of a multi-process run (see the module docstring). Returns True if it joined one,
    False when nothing was asked (a single-process run). Call it before any other JAX call.

    **Arguments:** `coordinator` (`"HOST:PORT"` of process 0), `num_processes`, `process_id`; or `auto=True` for a
    cluster JAX detects; `timeout`: seconds to wait for every process to connect; `heartbeat_timeout`: seconds after
    which a silent peer counts as dead and the run ends on every process.
    """
    check_hosts(coordinator, num_processes, process_id)
    if coordinator is None and not auto:
        return False
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs and TPUs use their own
    try:
        if auto:
            jax.distributed.initialize(initialization_timeout=timeout, heartbeat_timeout_seconds=heartbeat_timeout)
        else:
            jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout,
                                       heartbeat_timeout_seconds=heartbeat_timeout)
    except (RuntimeError, ValueError) as e:
        if "must be called before" in str(e):
            raise ValueError("join the hosts before any JAX computation or device query (call join_hosts first)") \
                from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "the cluster JAX detects" if auto else f"coordinator {coordinator}"
        raise ValueError(f"could not join {where} within {timeout} s ({first[:200]}); start every process with the "
                         "same coordinator and process count, process 0 first, and check the port is reachable") \
            from None
    return True
