"""One CPU per serving process: ``[server:main] cpu_affinity``.

waitress hands every request from its I/O thread to a worker thread and back, gunicorn's
``gthread`` worker from its poller to its pool, granian from its Rust I/O threads to its
blocking threads; only the thread holding the GIL runs Python. When those threads sit on
different CPUs, each hand-off wakes a CPU from idle and moves the interpreter's state between
caches. Measured under load (``bench/README.md``: 2-core VM, ``wrk -c16``, nginx upstream,
8 threads), the shipped gateway served 1.0–1.7 thousand req/s on waitress with its threads
spread over both CPUs and 2.3–2.7 thousand with them on one (wrk and the upstream still had
the other); gunicorn 1.3 against 2.1–2.3 thousand (granian 2.6 against 3.0–3.3 thousand:
see below). The
GIL lets one thread run Python at a time anyway, so one CPU costs a process no parallelism
it had; several processes (``workers``) each take their own CPU.

``cpu_affinity``:

* ``auto`` (the default): when the process may run on two CPUs or more, every thread of it
  on one of them — the ``pid mod n``-th of the CPUs it may use, so that the workers of one
  server, or several gateways on one host, spread out. Under waitress the serving process
  pins itself once its threads exist; under gunicorn each worker process does, once it has
  loaded the pipeline (the master is left alone). granian is left alone: pinned, its
  worker's exit at a stop outran the access line of a request that finished during the
  drain, every time (``tests/test_server_recipes.py``), a loss not worth its 17 %.
* ``off``: the operating system places the threads.
* a CPU list (``0``, ``2,3``, ``0-3``): exactly those CPUs.

Linux pins every thread present (``/proc/self/task``); threads started later inherit it.
Windows sets the process's affinity mask (``SetProcessAffinityMask``). Elsewhere (macOS has
no affinity call) the setting does nothing and says so once. A pin that fails (a container
that forbids it, a CPU not in the allowed set) is a warning, never a failure to start.
"""
from __future__ import annotations

import logging
import os
import sys
import typing as t
from pathlib import Path

__all__ = ["apply", "choose", "allowed_cpus", "pin"]

log = logging.getLogger("meetinity_gateway.server")

Affinity = t.Union[str, t.FrozenSet[int]]  # "auto", "off" or CPU numbers (config.as_cpu_affinity)


def allowed_cpus() -> frozenset[int] | None:
    """The CPUs this process may run on, or ``None`` where that cannot be known."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    if sys.platform == "win32":
        return frozenset(range(os.cpu_count() or 1))
    return None


def choose(setting: Affinity, allowed: t.AbstractSet[int] | None,
           pid: int) -> frozenset[int] | None:
    """The CPUs to pin to, or ``None`` for no pin."""
    if setting == "off" or allowed is None:
        return None
    if setting == "auto":
        if len(allowed) < 2:
            return None
        ordered = sorted(allowed)
        return frozenset({ordered[pid % len(ordered)]})
    return frozenset(setting)


def pin(cpus: t.AbstractSet[int]) -> int:
    """Every thread of this process on ``cpus``; returns how many threads were pinned.
    Raises ``OSError`` when the system refuses, ``NotImplementedError`` where there is no
    way to."""
    if hasattr(os, "sched_setaffinity"):
        tasks = Path("/proc/self/task")
        tids = [int(entry.name) for entry in tasks.iterdir()] if tasks.is_dir() else [0]
        pinned = 0
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                continue  # that thread ended meanwhile
            pinned += 1
        return pinned
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import ctypes
        from ctypes import wintypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.GetCurrentProcess.restype = wintypes.HANDLE
        kernel32.SetProcessAffinityMask.argtypes = [wintypes.HANDLE, ctypes.c_size_t]
        kernel32.SetProcessAffinityMask.restype = wintypes.BOOL
        mask = sum(1 << cpu for cpu in cpus)
        if not kernel32.SetProcessAffinityMask(kernel32.GetCurrentProcess(), mask):
            raise ctypes.WinError(ctypes.get_last_error())
        return 1
    raise NotImplementedError("this platform has no CPU affinity call")


def apply(setting: Affinity) -> frozenset[int] | None:
    """Pin the serving process as ``setting`` says (after the server's threads exist);
    the CPUs pinned to, or ``None``. Logs what it did; never raises."""
    try:
        cpus = choose(setting, allowed_cpus(), os.getpid())
    except OSError as exc:
        log.warning("cpu_affinity: the CPUs this process may use are unknown (%s); not "
                    "pinned", exc)
        return None
    if cpus is None:
        return None
    listed = ",".join(map(str, sorted(cpus)))
    try:
        threads = pin(cpus)
    except NotImplementedError as exc:
        log.info("cpu_affinity: %s; threads left where the system puts them", exc)
        return None
    except (OSError, ValueError) as exc:
        log.warning("cpu_affinity: could not pin the server to CPU %s (%s); threads left "
                    "where the system puts them", listed, exc)
        return None
    log.info("server threads on CPU %s (cpu_affinity = %s: the thread hand-offs stay on "
             "one CPU; %d threads, pid %d)", listed,
             "auto" if setting == "auto" else listed, threads, os.getpid())
    return cpus
