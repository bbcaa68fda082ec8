"""Profile the serving process UNDER LOAD: where a request's time goes while wrk drives it.

``python bench/underload.py [--duration 6] [--threads 8] [--rounds 3] [--strace]
[--variant NAME=SOURCE_TREE[,KEY=VALUE...]] [--throughput-only]``

The in-process per-layer table (``bench/layers.py``) times one request at a time on one
thread; under load the gateway costs several times more than it explains. This tool measures
the real thing. It starts the upstream (nginx when installed, else ``bench/fastupstream.py``),
the minimal stdlib pass-through on the hardened waitress (``bench/passthrough.py``) and the
gateway on waitress with the shipped ``gateway.ini`` (only the rate budgets lifted, as in
``bench/run.py``; a run with non-2xx answers says so), then:

1. **throughput**, interleaved: ``--rounds`` rounds of ``wrk -t1 -c16``, each round every
   server in turn (the order reversed every other round); the ratio gateway / pass-through is
   taken round by round (a neighbour's burst on a shared machine moves one pair) and reported
   as median [min–max];
2. for each server, one wrk run each with a sampler attached (py-spy must be installed:
   ``bench/requirements.txt``):

   * ``perf stat`` (Debian ``linux-perf``) on syscall tracepoints: syscalls per request by
     kind, context switches per request (thread hand-offs), CPU seconds per request;
     without perf, the threads' context switches from ``/proc``;
   * ``py-spy --nonblocking`` (on-CPU threads) and ``--gil`` (the thread holding the GIL):
     samples × sampling period / requests = µs per request, charged to the innermost frame
     that belongs to a layer (observe, errors, ..., router, proxy, the server, waitress;
     helpers and the standard library count for the layer that called them);
   * ``py-spy --idle --native`` (every thread, native frames): each thread's time per
     request split into running, waiting for the GIL (``take_gil`` / a
     ``pthread_cond_timedwait`` under the interpreter), waiting on a lock or condition
     (waitress' task queue, the pool), blocked on a socket (upstream or client) and the
     I/O thread's poll;
   * with ``--strace``, ``strace -c -f`` (slows the process several times: counts, not
     times, are meaningful).

``--variant`` adds gateways started from another source tree (prepended to ``PYTHONPATH``)
and/or with other environment values, measured in the same interleaved rounds: the way to
compare candidate fixes (``--throughput-only`` skips the samplers). Writes the report to
``bench/results/profile-<time>.md`` and prints it. About 3 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run  # noqa: E402  (the bench's services, upstream and wrk wrapper)

try:
    import jwt
except ImportError as missing:
    sys.exit(f"{missing.name} is missing: python -m pip install -r bench/requirements.txt")

ROOT = run.ROOT
SAMPLE_RATE = 250  # py-spy samples per second

#: Syscalls counted one by one (``perf stat`` tracepoints); the rest is "other".
SYSCALLS = ("futex", "poll", "epoll_wait", "select", "recvfrom", "recvmsg", "read", "sendto",
            "sendmsg", "write", "writev", "ioctl", "getrandom", "getpid", "gettid",
            "clock_gettime", "fcntl", "setsockopt", "getsockopt", "connect", "accept4",
            "close", "openat", "newfstatat", "lseek", "mmap", "munmap", "madvise", "brk")

#: Source files -> the layer their time is charged to (first match wins, innermost frame).
LAYER_FILES = (
    ("meetinity_gateway/middleware/", None),  # the module's name: observe, errors, ...
    ("meetinity_gateway/proxy/", "proxy"),
    ("meetinity_gateway/routing.py", "router"),
    ("meetinity_gateway/pathrules.py", "router"),
    ("meetinity_gateway/server.py", "server (hardened waitress)"),
    ("bench/passthrough.py", "pass-through app"),
    ("waitress/", "waitress"),
)

#: Leaf functions where a thread waits (py-spy frames are ``function (file:line)``).
_SOCKET_WAITS = {"readinto", "recv", "recv_into", "_recv_into", "recvfrom", "sendall", "send",
                 "sendto", "write", "flush", "readline", "read", "_readinto"}
_LOCK_WAITS = {"wait", "acquire", "get", "_wait_for_tstate_lock", "join"}
_POLL_WAITS = {"poll", "poll2", "select", "loop"}


def layer_of(frame: str) -> str | None:
    """The layer a py-spy frame belongs to, None for helpers and the standard library."""
    match = re.search(r"\((.*?)(?::\d+)?\)$", frame)
    path = match.group(1) if match else ""
    for marker, name in LAYER_FILES:
        if marker in path:
            if name is None:
                return "mw:" + Path(path).stem
            return name
    return None


def read_stacks(path: Path):
    """(frames outermost first, count) per line of py-spy's raw output."""
    if not path.exists():
        return
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def charge(frames: list[str]) -> str:
    for frame in reversed(frames):
        layer = layer_of(frame)
        if layer is not None:
            return layer
    return "other (no layer frame)"


def python_leaf(frames: list[str]) -> str:
    for frame in reversed(frames):
        if re.search(r"\.py:\d+\)$", frame):
            return frame
    return frames[-1] if frames else ""


def thread_state(frames: list[str]) -> str:
    """What a thread was doing in one ``--idle --native`` sample."""
    names = [frame.split(" (")[0] for frame in frames]
    python_frames = [frame for frame in frames if re.search(r"\.py:\d+\)$", frame)]
    role = "I/O thread" if any("server.py" in f and "run" in f.split(" (")[0]
                               for f in python_frames) or any(
        "wasyncore.py" in f for f in python_frames) else "worker"
    if any("handler_thread" in f for f in python_frames):
        role = "worker"
    # native frames below the innermost Python frame
    last_py = max((i for i, f in enumerate(frames) if f in python_frames), default=-1)
    native_tail = names[last_py + 1:]
    leaf_py = python_frames[-1].split(" (")[0].rsplit(".", 1)[-1] if python_frames else ""
    if any(name in ("take_gil", "PyEval_RestoreThread", "PyEval_AcquireThread")
           for name in native_tail) or (
            native_tail and any(n.startswith("pthread_cond_timedwait") for n in native_tail)
            and not any(n.startswith("sem_") for n in native_tail)):
        return f"{role}: waiting for the GIL"
    if leaf_py in _POLL_WAITS or any(n in ("poll", "__poll", "select_poll_poll_impl")
                                     for n in native_tail):
        return f"{role}: in poll()"
    if leaf_py in _LOCK_WAITS or any(n.startswith("sem_") for n in native_tail):
        return f"{role}: waiting on a lock/condition"
    socket_calls = ("recv", "send", "__libc_recv", "__libc_send")
    if leaf_py in _SOCKET_WAITS or any(n.startswith(socket_calls) for n in native_tail):
        return f"{role}: blocked in a socket call"
    return f"{role}: running Python"


class Target:
    def __init__(self, name: str, url: str, pid: int, headers: dict[str, str]) -> None:
        self.name, self.url, self.pid, self.headers = name, url, pid, headers
        self.rps: list[float] = []
        self.cpu: list[float] = []  # process CPU µs per request, each round
        self.switches: list[float] = []  # context switches per request, each round
        self.profile: dict = {}


def measured_run(target: Target, duration: int) -> None:
    """One throughput run: req/s, and the process' CPU and context switches per request
    (both far less sensitive than req/s to what the machine's other users do)."""
    switches, (user, system) = thread_switches(target.pid), cpu_seconds(target.pid)
    result = wrk_run(target, duration)
    user_now, system_now = cpu_seconds(target.pid)
    target.rps.append(result["rps"])
    target.cpu.append((user_now - user + system_now - system) / result["requests"] * 1e6)
    target.switches.append((thread_switches(target.pid) - switches) / result["requests"])


def wrk_run(target: Target, duration: int) -> dict:
    result = run.wrk(target.url, duration, target.headers)
    if result["non2xx"] or result["errors"]:
        print(f"  {target.name}: {result['non2xx']} non-2xx, errors {result['errors']}",
              flush=True)
    return result


def with_sampler(target: Target, duration: int, sampler: list[str] | None) -> tuple[dict, str]:
    """One wrk run while ``sampler`` (a command, or None) watches the target."""
    process = None
    if sampler:
        process = subprocess.Popen(sampler, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        time.sleep(0.5)  # attached before the load starts
    result = wrk_run(target, duration)
    output = ""
    if process is not None:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            output = process.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
    return result, output


def thread_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        for key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            found = re.search(rf"^{key}:\s+(\d+)", text, re.MULTILINE)
            total += int(found.group(1)) if found else 0
    return total


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the whole process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def perf_symbols(target: Target, duration: int, tmp: Path) -> dict:
    """CPU µs per request by shared object and top symbols (``perf record``, no call
    graphs: where the CPU goes, kernel included; Python 3.11 frames show as the interpreter).
    """
    data = tmp / f"perf-{target.pid}.data"
    result, _ = with_sampler(target, duration, [
        "perf", "record", "-q", "-F", "997", "-p", str(target.pid), "-o", str(data),
        "--", "sleep", str(duration + 1)])
    report_args = ["perf", "report", "-i", str(data), "--stdio", "--no-children",
                   "-q", "--percent-limit", "0.5"]
    out: dict = {}
    for key, sort in (("dso", "dso"), ("sym", "dso,sym")):
        text = subprocess.run(report_args + ["--sort", sort], capture_output=True, text=True,
                              timeout=120).stdout
        rows = []
        for line in text.splitlines():
            match = re.match(r"\s*([\d.]+)%\s+(.*\S)", line)
            if match:
                rows.append((re.sub(r"\s+", " ", match.group(2)), float(match.group(1))))
        out[key] = rows
    out["rps"] = result["rps"]
    return out


def profile_target(target: Target, duration: int, py_spy: str | None, tmp: Path,
                   use_strace: bool) -> None:
    out = target.profile
    # syscalls, context switches, CPU: perf stat (cheap), else /proc
    switches, (user, system) = thread_switches(target.pid), cpu_seconds(target.pid)
    perf = shutil.which("perf")
    events = ",".join(["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{name}"
                                                    for name in SYSCALLS]
                      + ["context-switches", "cpu-migrations"])
    sampler = [perf, "stat", "-x", ";", "-e", events, "-p", str(target.pid)] if perf else None
    result, output = with_sampler(target, duration, sampler)
    requests = result["requests"]
    out["requests/s (sampled run)"] = result["rps"]
    user_now, system_now = cpu_seconds(target.pid)
    out["user_us"] = (user_now - user) / requests * 1e6
    out["sys_us"] = (system_now - system) / requests * 1e6
    out["cpu_us"] = out["user_us"] + out["sys_us"]
    out["switches_proc"] = (thread_switches(target.pid) - switches) / requests
    counts = {}
    for line in output.splitlines():
        parts = line.split(";")
        if len(parts) > 3 and parts[0].strip().isdigit():
            counts[parts[2]] = int(parts[0])
    if counts:
        total = counts.pop("raw_syscalls:sys_enter", 0)
        out["context switches"] = counts.pop("context-switches", 0) / requests
        counts.pop("cpu-migrations", None)
        per = {name.replace("syscalls:sys_enter_", ""): value / requests
               for name, value in counts.items() if value}
        per["other"] = max(0.0, total / requests - sum(per.values()))
        out["syscalls"] = dict(sorted(per.items(), key=lambda item: -item[1]))
        out["syscalls total"] = total / requests
    if use_strace and shutil.which("strace"):
        summary = tmp / f"strace-{target.name}.txt"
        result, _ = with_sampler(target, duration, ["strace", "-c", "-f", "-q", "-o",
                                                    str(summary), "-p", str(target.pid)])
        strace = {}
        if summary.exists():
            for line in summary.read_text().splitlines():
                cols = line.split()
                if len(cols) >= 5 and cols[0][0].isdigit() and cols[-1] != "total":
                    calls = int(cols[3])
                    strace[cols[-1]] = calls / result["requests"]
        out["strace"] = dict(sorted(strace.items(), key=lambda item: -item[1]))
    if perf:
        out["perf"] = perf_symbols(target, duration, tmp)
    if not py_spy:
        return
    base = [py_spy, "record", "--pid", str(target.pid), "--rate", str(SAMPLE_RATE),
            "--format", "raw", "--full-filenames", "--duration", str(duration + 2)]
    for view, flags in (("cpu", ["--nonblocking"]), ("gil", ["--gil", "--nonblocking"]),
                        ("idle", ["--idle", "--native"])):
        raw = tmp / f"{target.name}-{view}.txt"
        result, _ = with_sampler(target, duration, base + flags + ["-o", str(raw)])
        by_layer: collections.Counter = collections.Counter()
        leaves: collections.Counter = collections.Counter()
        for frames, count in read_stacks(raw):
            if view == "idle":
                by_layer[thread_state(frames)] += count
            else:
                by_layer[charge(frames)] += count
                leaves[python_leaf(frames)] += count
        # samples / rate = thread-seconds; per request over the sampled run's requests
        # (py-spy runs 2 s beyond wrk: the idle tail is excluded from cpu and gil views
        # by construction, and the idle view is read as shares).
        scale = 1e6 / SAMPLE_RATE / result["requests"]
        out[view] = {key: value * scale for key, value in by_layer.most_common()}
        out[view + " rps"] = result["rps"]
        out[view + " leaves"] = [(leaf, value * scale) for leaf, value in leaves.most_common(12)]


def report(targets: list[Target], args, upstream_kind: str, load: str) -> str:
    base = targets[0]
    lines = [f"# Profile under load {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"Machine: {run.machine()}. Load average at start: {load}.",
             f"Upstream: {upstream_kind}. Load: `wrk -t1 -c16 -d{args.duration}s`; "
             f"{args.threads} threads; {args.rounds} interleaved rounds (median [min–max]; "
             "ratios taken round by round).", "",
             "| server | req/s median [min–max] | × pass-through, same round | "
             "× shipped gateway, same round | CPU µs/request | context switches/request |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def spread(values, digits=3):
        return (f"{statistics.median(values):,.{digits}f} "
                f"[{min(values):,.{digits}f}–{max(values):,.{digits}f}]")

    shipped = targets[1] if len(targets) > 1 else base
    for target in targets:
        lines.append(
            f"| {target.name} | {spread(target.rps, 0)} | "
            f"{spread([a / b for a, b in zip(target.rps, base.rps)])} | "
            f"{spread([a / b for a, b in zip(target.rps, shipped.rps)])} | "
            f"{spread(target.cpu, 0)} | {spread(target.switches, 1)} |")
    profiled = [target for target in targets if target.profile]
    if not profiled:
        return "\n".join(lines) + "\n"
    names = [target.name for target in profiled]
    header = "| | " + " | ".join(names) + " |"
    rule = "| --- |" + " ---: |" * len(names)

    def table(title, rows):
        lines.extend(["", title, "", header, rule])
        for label, values in rows:
            lines.append(f"| {label} | " + " | ".join(values) + " |")

    def num(value, digits=1):
        return "–" if value is None else f"{value:,.{digits}f}"

    table("Per request, from the sampled runs:", [
        ("CPU µs, throughput rounds (no sampler), median",
         [num(statistics.median(t.cpu), 0) if t.cpu else "–" for t in profiled]),
        ("context switches, throughput rounds, median",
         [num(statistics.median(t.switches)) if t.switches else "–" for t in profiled]),
        ("CPU µs under perf stat (tracepoints make syscalls dearer)",
         [num(t.profile.get("cpu_us"), 0) for t in profiled]),
        ("… of which user", [num(t.profile.get("user_us"), 0) for t in profiled]),
        ("… of which system (kernel)", [num(t.profile.get("sys_us"), 0) for t in profiled]),
        ("GIL held µs (py-spy --gil)",
         [num(sum(t.profile.get("gil", {}).values()), 0) for t in profiled]),
        ("on-CPU thread µs (py-spy)",
         [num(sum(t.profile.get("cpu", {}).values()), 0) for t in profiled]),
        ("syscalls", [num(t.profile.get("syscalls total")) for t in profiled]),
        ("context switches (perf)", [num(t.profile.get("context switches")) for t in profiled]),
        ("context switches (/proc, all threads)",
         [num(t.profile.get("switches_proc")) for t in profiled]),
    ])
    for view, title in (("gil", "µs per request with the GIL held, by layer (py-spy --gil; "
                                "stdlib and helpers count for the layer calling them):"),
                        ("cpu", "µs per request on a CPU, by layer (py-spy, threads running):"),
                        ("idle", "Thread-µs per request by state (py-spy --idle --native, "
                                 "every thread; the sampler pauses the process, read the "
                                 "shares):")):
        keys = []
        for target in profiled:
            for key in target.profile.get(view, {}):
                if key not in keys:
                    keys.append(key)
        rows = []
        for key in keys:
            rows.append((key, [num(t.profile.get(view, {}).get(key, 0.0)) for t in profiled]))
        if view == "idle":
            for target in profiled:
                states = target.profile.get(view, {})
                busy = sum(v for k, v in states.items() if "lock" not in k and "poll" not in k)
                gil = sum(v for k, v in states.items() if "GIL" in k)
                target.profile["gil share"] = gil / busy if busy else 0.0
            rows.append(("GIL wait / (running + GIL wait + socket)",
                         [f"{t.profile['gil share']:.0%}" for t in profiled]))
        table(title, rows)
    kinds = []
    for target in profiled:
        for key in target.profile.get("syscalls", {}):
            if key not in kinds:
                kinds.append(key)
    table("Syscalls per request by kind (perf stat tracepoints):",
          [(kind, [num(t.profile.get("syscalls", {}).get(kind, 0.0), 2) for t in profiled])
           for kind in kinds])
    if any(t.profile.get("strace") for t in profiled):
        kinds = []
        for target in profiled:
            for key in list(target.profile.get("strace", {}))[:14]:
                if key not in kinds:
                    kinds.append(key)
        table("Syscalls per request, strace -c -f (process slowed by strace):",
              [(kind, [num(t.profile.get("strace", {}).get(kind, 0.0), 2) for t in profiled])
               for kind in kinds])
    for target in profiled:
        perf = target.profile.get("perf")
        if not perf:
            continue
        # shares of the unsampled rounds' CPU (perf stat's tracepoints inflate its own run)
        cpu = statistics.median(target.cpu) if target.cpu else target.profile["cpu_us"]
        lines.extend(["", f"perf record, {target.name}: CPU µs per request by object "
                      "(share × CPU µs/request of the unsampled rounds):", ""])
        lines.append(", ".join(f"{name} {share * cpu / 100:.0f}" for name, share in perf["dso"]))
        lines.extend(["", "top symbols (µs/request):", ""])
        for name, share in perf["sym"][:18]:
            lines.append(f"- {share * cpu / 100:.1f} {name}")
    for target in profiled:
        lines.extend(["", f"Top Python leaves with the GIL held, {target.name} (µs/request):",
                      ""])
        for leaf, value in target.profile.get("gil leaves", []):
            lines.append(f"- {value:.1f} {leaf}")
    return "\n".join(lines) + "\n"


def parse_variant(text: str) -> tuple[str, str | None, dict[str, str]]:
    name, _, rest = text.partition("=")
    parts = [part for part in rest.split(",") if part]
    tree = None
    env = {}
    for part in parts:
        if "=" in part:
            key, _, value = part.partition("=")
            env[key] = value
        else:
            tree = str(Path(part).resolve())
    return name, tree, env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=6, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=8, help="server threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    parser.add_argument("--strace", action="store_true", help="also strace -c -f (slow)")
    parser.add_argument("--throughput-only", action="store_true", help="no samplers")
    parser.add_argument("--no-gateway-profile", action="store_true",
                        help="sample only the pass-through and the shipped gateway")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=SOURCE_TREE[,KEY=VALUE...] or NAME=KEY=VALUE[,...]: "
                             "one more gateway, from that tree and/or environment")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    py_spy = shutil.which("py-spy") or (
        str(Path(sys.executable).with_name("py-spy"))
        if Path(sys.executable).with_name("py-spy").exists() else None)
    if not py_spy and not args.throughput_only:
        print("py-spy is not installed (pip install -r bench/requirements.txt): no samples",
              flush=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path(
        "/proc/loadavg").exists() else "?"
    services = run.Services()
    secret = secrets.token_urlsafe(48)
    now = int(time.time())
    token = jwt.encode({"sub": 42, "email": "ada@example.com", "iat": now, "exp": now + 3600},
                       secret, algorithm="HS256")
    headers = {"Authorization": f"Bearer {token}", "Origin": run.ORIGIN}
    py = sys.executable
    targets: list[Target] = []
    try:
        port, proxy_port = run.free_port(), run.free_port()
        if shutil.which("nginx"):
            upstream_kind = run.start_nginx(services, port, proxy_port)
        else:
            upstream_kind = "bench/fastupstream.py"
            services.start([py, str(BENCH / "fastupstream.py"), "127.0.0.1", str(port)], port)
        upstream = f"http://127.0.0.1:{port}"
        listen = run.free_port()
        process = services.start([py, str(BENCH / "passthrough.py"), "stdlib", upstream,
                                  f"127.0.0.1:{listen}", str(args.threads)], listen)
        targets.append(Target("stdlib pass-through", f"http://127.0.0.1:{listen}/users/42",
                              process.pid, {}))
        variants = [("gateway (shipped)", None, {})] + [parse_variant(v) for v in args.variant]
        for name, tree, extra in variants:
            env = run.gateway_environment(secret, int(extra.get("GATEWAY_THREADS",
                                                                args.threads)))
            env["USER_SERVICE_URL"] = upstream
            env.update(extra)
            cwd = tree or str(ROOT)  # python -m imports from its working directory first
            if tree:
                env["PYTHONPATH"] = tree + os.pathsep + os.environ.get("PYTHONPATH", "")
            loaded = subprocess.run(
                [py, "-c", "import meetinity_gateway; print(meetinity_gateway.__file__)"],
                env=dict(os.environ, **env), cwd=cwd, capture_output=True, text=True,
                timeout=60).stdout.strip()
            print(f"{name}: {loaded}", flush=True)
            listen = run.free_port()
            process = services.start(
                [py, "-m", "meetinity_gateway", "serve", "--server", "waitress", "--listen",
                 f"127.0.0.1:{listen}", "--threads", env["GATEWAY_THREADS"]], listen, env=env,
                timeout=60, cwd=cwd)
            target = Target(name, f"http://127.0.0.1:{listen}{run.SMALL_PATH}", process.pid,
                            headers)
            check = run.requests.get(target.url, headers=headers, timeout=10)
            if check.status_code != 200:
                raise RuntimeError(f"{name}: {check.status_code} {check.text[:200]}")
            targets.append(target)
        for target in targets:  # warm-up, not counted
            run.wrk(target.url, 2, target.headers)
        for index in range(args.rounds):
            order = targets if index % 2 == 0 else list(reversed(targets))
            for target in order:
                measured_run(target, args.duration)
            done = ", ".join(f"{t.name} {t.rps[-1]:,.0f}" for t in targets)
            print(f"round {index + 1}: {done}", flush=True)
        if not args.throughput_only:
            sampled = targets if not args.no_gateway_profile else targets[:2]
            for target in sampled:
                print(f"profiling {target.name} ...", flush=True)
                profile_target(target, args.duration, py_spy, services.tmp, args.strace)
    finally:
        text = report(targets, args, upstream_kind, load) if targets and targets[0].rps else ""
        services.stop()
    print()
    print(text)
    run.RESULTS.mkdir(exist_ok=True)
    out = run.RESULTS / f"profile-{dt.datetime.now():%Y%m%d-%H%M%S}.md"
    out.write_text(text, encoding="utf-8")
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
