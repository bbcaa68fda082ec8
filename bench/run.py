"""Benchmark the gateway against minimal pass-throughs measured in the same run.

``python bench/run.py [--rounds 3] [--duration 5] [--threads 8] [--rate 300] [--skip-layers]``

Installs nothing: it needs ``wrk`` (Debian package), the packages of
``requirements-dev.txt`` (granian, gunicorn, requests, PyJWT) and, optionally, nginx as the
upstream (else ``bench/fastupstream.py``, asyncio). Everything listens on loopback, every
row is measured in this run with ``wrk -t1 -c16`` on the bench's small JSON GET (a valid
token, an allowed Origin), the throughput rows in interleaved rounds (medians reported, ratios
taken round by round):

* the minimal pass-through (``bench/passthrough.py``) on urllib3 and on stdlib
  ``http.client`` (one kept-alive connection per thread), and the gateway's full pipeline
  (``gateway.ini``, rate limits that never trigger) — each on waitress, on granian (WSGI,
  1 worker, N blocking threads) and on gunicorn (``gthread``, 1 worker, N threads);
* the added latency at a fixed rate (open loop, no coordinated omission), upstream direct
  vs the gateway on waitress;
* 1 GiB streamed down and up through the gateway on waitress, and the growth of its
  resident memory (peak, ``VmHWM``);
* what each layer costs per request (``bench/layers.py``, in-process).

Prints Markdown and writes it, and the raw numbers as JSON, to ``bench/results/`` (ignored
by git; ``reference.md`` there is a committed run). About 5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    import jwt
    import requests
except ImportError as missing:  # installs nothing by itself: say what is needed
    sys.exit(f"{missing.name} is missing: python -m pip install -r requirements-dev.txt")

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
ORIGIN = "https://app.meetinity.test"
SMALL_PATH = "/api/users/42"
TRANSFER = 1 << 30  # 1 GiB each way


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing on port {port}")


class Services:
    """Every process this run starts, stopped together at the end."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="meetinity-bench-"))

    def start(self, args, port, env=None, timeout: float = 20, **kw) -> subprocess.Popen:
        full_env = dict(os.environ)
        full_env.update(env or {})
        kw.setdefault("cwd", str(ROOT))
        process = subprocess.Popen(args, env=full_env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, **kw)
        self.processes.append(process)
        wait_port(port, process, timeout)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_nginx(services: Services, upstream_port: int, proxy_port: int) -> str:
    conf = services.tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {services.tmp}/nginx.pid;
error_log {services.tmp}/error.log error;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {services.tmp}/body;
    proxy_temp_path {services.tmp}/proxy;
    fastcgi_temp_path {services.tmp}/fastcgi;
    uwsgi_temp_path {services.tmp}/uwsgi;
    scgi_temp_path {services.tmp}/scgi;
    client_max_body_size 0;
    keepalive_requests 1000000;
    upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{upstream_port};
        location ~ /download$ {{
            alias {services.tmp}/blob;
            default_type application/octet-stream;
        }}
        location / {{
            default_type application/json;
            return 200 '{{"id":42,"name":"Ada Lovelace","headline":"Engineer"}}';
        }}
    }}
    server {{
        listen 127.0.0.1:{proxy_port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
    with open(services.tmp / "blob", "wb") as blob:
        blob.truncate(TRANSFER)
    # nginx workers drop root privileges: they must be able to read the file.
    services.tmp.chmod(0o755)
    (services.tmp / "blob").chmod(0o644)
    services.start(["nginx", "-c", str(conf), "-p", str(services.tmp)], upstream_port)
    wait_port(proxy_port)
    return "nginx 1 worker, fixed JSON"


def wrk(url: str, duration: int, headers: dict[str, str]) -> dict:
    args = ["wrk", "-t1", "-c16", f"-d{duration}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    output = subprocess.run(args + [url], capture_output=True, text=True,
                            timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    total = int(re.search(r"(\d+) requests in ", output).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    error_count = sum(int(n) for n in re.findall(r"\d+", errors.group(1))) if errors else 0

    def percentile(p):
        match = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    result = {"rps": rps, "p50": percentile(50), "p99": percentile(99), "requests": total,
              "non2xx": int(non2xx.group(1)) if non2xx else 0,
              "errors": errors.group(1) if errors else ""}
    # A row whose answers are not all 2xx measured refusals, not throughput: failed.
    result["failed"] = bool(result["non2xx"] or error_count)
    return result


#: What the gateway rows run, printed by the bench and written into its report.
SHIPPED_NOTE = ("Gateway rows run gateway.ini as shipped (bulkhead, queue, timeouts, "
                "ejection, retries, rate limits: the per-address default off, the per-user "
                "rule on /api/users counting every request); only the budget of the rule the "
                "bench's requests meet is lifted (RATE_LIMIT_USERS = 100000000/minute), so "
                "one client may send every request. A row whose answers are not all 2xx is "
                "FAILED.")


def combined(results: list[dict]) -> dict:
    """One row from its runs: medians of throughput and latency, every answer counted."""
    return {
        "rps": statistics.median(r["rps"] for r in results),
        "p50": statistics.median(r["p50"] for r in results),
        "p99": statistics.median(r["p99"] for r in results),
        "requests": sum(r["requests"] for r in results),
        "non2xx": sum(r["non2xx"] for r in results),
        "errors": "; ".join(r["errors"] for r in results if r["errors"]),
        "failed": any(r["failed"] for r in results),
        "runs": [r["rps"] for r in results],
    }


def round_ratio(runs: dict, server: str, kind: str, reference: str) -> tuple[float, float, float]:
    """``kind``'s throughput over ``reference``'s, round by round: median, min, max."""
    def of(wanted):
        return next(results for (s, k, _), results in runs.items() if (s, k) == (server, wanted))

    ratios = [a["rps"] / b["rps"] for a, b in zip(of(kind), of(reference))]
    return statistics.median(ratios), min(ratios), max(ratios)


def failed(result: dict) -> str:
    """How a wrk row failed: its non-2xx answers and socket errors, never a throughput."""
    return (f"FAILED: {result['non2xx']} of {result['requests']} answers not 2xx"
            + (f", socket errors {result['errors']}" if result["errors"] else ""))


def fixed_rate(url: str, headers: dict[str, str], rate: int, duration: int) -> dict:
    """Open-loop load: requests scheduled at ``rate``/s; latency measured from the schedule
    (so a stall counts for every request it delays, no coordinated omission)."""
    workers = 8
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.2
    total = rate * duration

    def worker(offset: int) -> None:
        client = requests.Session()
        client.trust_env = False
        own = []
        for index in range(offset, total, workers):
            due = start + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            response = client.get(url, headers=headers, timeout=10)
            response.content
            own.append((time.perf_counter() - due) * 1000)
            if not 200 <= response.status_code < 300:
                failures.append(response.status_code)
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return {"p50": statistics.median(latencies),
            "p99": latencies[int(len(latencies) * 0.99) - 1], "non2xx": len(failures)}


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def transfers(gateway_url: str, headers: dict[str, str], pid: int) -> dict:
    client = requests.Session()
    client.trust_env = False
    base = peak_rss_kib(pid)
    started = time.perf_counter()
    received = 0
    with client.get(gateway_url + f"/api/users/42/download?size={TRANSFER}", headers=headers,
                    stream=True, timeout=120) as response:
        for chunk in response.iter_content(1 << 20):
            received += len(chunk)
    down = received / (time.perf_counter() - started) / 1e6
    down_rss = (peak_rss_kib(pid) - base) / 1024

    class Body:
        def __len__(self):
            return TRANSFER

        def __iter__(self):
            block = b"u" * (1 << 20)
            left = TRANSFER
            while left:
                piece = block[:min(left, len(block))]
                left -= len(piece)
                yield piece

    base = peak_rss_kib(pid)
    started = time.perf_counter()
    # /api/users/42/...: the caller (sub 42) owns it (rule.user_own)
    response = client.post(gateway_url + "/api/users/42/upload", data=Body(), timeout=300,
                           headers=dict(headers, **{"Content-Length": str(TRANSFER)}))
    up = TRANSFER / (time.perf_counter() - started) / 1e6
    up_rss = (peak_rss_kib(pid) - base) / 1024
    return {"down_mb_s": down, "down_rss_mib": down_rss, "down_bytes": received,
            "up_mb_s": up, "up_rss_mib": up_rss, "up_status": response.status_code}


def machine() -> str:
    cpu = platform.processor() or "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"model name\s*:\s*(.*)", cpuinfo.read_text())
        cpu = found.group(1) if found else cpu
    import waitress  # noqa: F401  (version below)
    from importlib.metadata import version
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), "
            f"Python {platform.python_version()}, waitress {version('waitress')}, "
            f"urllib3 {version('urllib3')}, granian {version('granian')}, "
            f"gunicorn {version('gunicorn')}")


SERVERS = ("waitress", "granian", "gunicorn")
LAYER_ORDER = ("observe", "errors", "cors", "ratelimit", "auth", "authorize", "userlimit",
               "router", "proxy")


def start_rows(services: Services, server: str, upstream: str, threads: int,
               gateway_env: dict[str, str]) -> dict[str, str]:
    """Start the three contenders on ``server``; their base URLs by kind."""
    py = sys.executable
    urls = {}
    clients = ("urllib3", "stdlib") + (("werkzeug", "stdlib_pinned") if server == "waitress"
                                       else ())
    for client in clients:
        port = free_port()
        if client == "stdlib_pinned":  # pinned to one CPU as the gateway pins itself
            services.start([py, str(BENCH / "passthrough.py"), "stdlib", upstream,
                            f"127.0.0.1:{port}", str(threads), server], port,
                           env={"PASSTHROUGH_CPU_AFFINITY": "auto"})
        elif server == "gunicorn":
            services.start(
                [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread",
                 "--threads", str(threads), "-b", f"127.0.0.1:{port}", "--log-level",
                 "warning", "--chdir", str(BENCH), "passthrough:app"], port,
                env={"PASSTHROUGH_CLIENT": client, "PASSTHROUGH_UPSTREAM": upstream,
                     "PASSTHROUGH_THREADS": str(threads)})
        else:
            services.start([py, str(BENCH / "passthrough.py"), client, upstream,
                            f"127.0.0.1:{port}", str(threads), server], port)
        urls[client] = f"http://127.0.0.1:{port}"
    port = free_port()
    process = services.start(
        [py, "-m", "meetinity_gateway", "serve", "--server", server, "--listen",
         f"127.0.0.1:{port}", "--threads", str(threads)], port, env=gateway_env, timeout=60)
    urls["gateway"] = f"http://127.0.0.1:{port}"
    urls["gateway_pid"] = str(process.pid)
    return urls


def gateway_environment(secret: str, threads: int) -> dict[str, str]:
    """The gateway's environment for the bench: ``gateway.ini`` as shipped, only the rate
    budgets lifted (see :data:`SHIPPED_NOTE`), ``threads`` server threads."""
    return {
        "JWT_SECRET": secret, "CORS_ORIGINS": ORIGIN,
        # The per-user rule on /api/users counts every request and never refuses one: one
        # token sends them all. Nothing else is changed (the per-address default ships off).
        "RATE_LIMIT_USERS": "100000000/minute",
        "MAX_BODY_SIZE": str(TRANSFER * 2), "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"),
        "GATEWAY_CONFIG": str(ROOT / "gateway.ini"), "GATEWAY_THREADS": str(threads),
        "GATEWAY_WORKERS": "1", "RELOAD": "false",
    }


def layer_costs(upstream: str, token: str, env: dict[str, str]) -> dict:
    full_env = dict(os.environ, **env)
    done = subprocess.run(
        [sys.executable, str(BENCH / "layers.py"), upstream, "--token", token,
         "--origin", ORIGIN, "--requests", "1000", "--rounds", "12"],
        env=full_env, cwd=str(ROOT), capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        raise RuntimeError(f"bench/layers.py failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the throughput rows (medians reported)")
    parser.add_argument("--threads", type=int, default=8, help="server threads")
    parser.add_argument("--rate", type=int, default=300, help="fixed rate, requests/s")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="comma-separated subset of waitress,granian,gunicorn")
    parser.add_argument("--skip-layers", action="store_true", help="no per-layer table")
    parser.add_argument("--skip-transfers", action="store_true", help="no 1 GiB transfers")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    if "waitress" not in servers:
        sys.exit("--servers must include waitress (the targets are measured there)")
    if os.name != "posix" and "gunicorn" in servers:
        servers.remove("gunicorn")
    import importlib.util

    for name in list(servers):
        if importlib.util.find_spec(name) is None:  # an optional extra not installed
            print(f"{name} is not installed (pip install -r requirements-dev.txt): skipped",
                  flush=True)
            servers.remove(name)
    begun = time.monotonic()

    services = Services()
    secret = secrets.token_urlsafe(48)
    now = int(time.time())
    token = jwt.encode({"sub": 42, "email": "ada@example.com", "iat": now,
                        "exp": now + 3600}, secret, algorithm="HS256")
    gateway_headers = {"Authorization": f"Bearer {token}", "Origin": ORIGIN}
    gateway_env = gateway_environment(secret, args.threads)
    # Everything else is gateway.ini as shipped: bulkhead, queue, timeouts, ejection, retries.
    print(SHIPPED_NOTE, flush=True)
    rows: list[tuple[str, str, str, dict]] = []  # (server, kind, label, wrk result)
    runs: dict[tuple[str, str, str], list[dict]] = {}  # each row's runs, round by round
    notes: list[str] = []
    results: dict = {"rows": [], "threads": args.threads, "duration": args.duration}
    try:
        ports = {"upstream": free_port(), "nginx_proxy": free_port()}
        if shutil.which("nginx"):
            upstream_kind = start_nginx(services, ports["upstream"], ports["nginx_proxy"])
        else:
            upstream_kind = "bench/fastupstream.py (asyncio, 1 process; nginx not installed)"
            services.start([sys.executable, str(BENCH / "fastupstream.py"), "127.0.0.1",
                            str(ports["upstream"])], ports["upstream"])
        upstream = f"http://127.0.0.1:{ports['upstream']}"
        gateway_env["USER_SERVICE_URL"] = upstream

        def measure(server, kind, label, url, headers=None):
            result = wrk(url, args.duration, headers or {})
            rows.append((server, kind, label, result))
            if result["failed"]:
                print(f"{label}: {failed(result)}", flush=True)
                notes.append(f"{label}: {failed(result)}")
            else:
                print(f"{label}: {result['rps']:,.0f} req/s, p50 {result['p50']:.2f} ms, "
                      f"p99 {result['p99']:.2f} ms", flush=True)
            return result

        direct = measure("-", "direct", "upstream direct", upstream + "/users/42")
        urls = {}
        labels = {}
        for server in servers:
            urls[server] = start_rows(services, server, upstream, args.threads, gateway_env)
            check = requests.get(urls[server]["gateway"] + SMALL_PATH, headers=gateway_headers,
                                 timeout=10)
            if (check.status_code != 200
                    or check.headers.get("Access-Control-Allow-Origin") != ORIGIN):
                raise RuntimeError(f"gateway on {server}: {check.status_code} "
                                   f"{check.text[:200]}")
            labels[server] = [
                ("urllib3", f"minimal pass-through on {server}, urllib3 pool", "/users/42"),
                ("stdlib", f"minimal pass-through on {server}, stdlib http.client (one "
                 "kept-alive connection per thread)", "/users/42"),
                *([("werkzeug", f"werkzeug ProxyMiddleware bare on {server} (a new upstream "
                    "connection per request)", "/users/42")] if "werkzeug" in urls[server]
                  else []),
                *([("stdlib_pinned", f"minimal pass-through on {server}, stdlib http.client, "
                    "on one CPU as the gateway puts itself (cpu_affinity = auto)",
                    "/users/42")] if "stdlib_pinned" in urls[server] else []),
                ("gateway", f"**gateway, full pipeline, {server}**", SMALL_PATH),
            ]
        # Rounds: every row of every server once per round, the order reversed every other
        # round, so that a neighbour's burst or the machine's drift lands on one run of
        # every row, not on every run of one. A row's figures are the medians of its runs;
        # a ratio is taken round by round (both rows measured minutes apart at most).
        for number in range(args.rounds):
            for server in servers:
                kinds = labels[server] if number % 2 == 0 else labels[server][::-1]
                for kind, label, path in kinds:
                    result = wrk(urls[server][kind] + path, args.duration,
                                 gateway_headers if kind == "gateway" else {})
                    runs.setdefault((server, kind, label), []).append(result)
                    print(f"round {number + 1}, {label}: "
                          + (failed(result) if result["failed"]
                             else f"{result['rps']:,.0f} req/s"), flush=True)
        for (server, kind, label), results_of_row in runs.items():
            row = combined(results_of_row)
            rows.append((server, kind, label, row))
            if row["failed"]:
                notes.append(f"{label}: {failed(row)}")

        waitress_gateway = urls["waitress"]["gateway"]
        print(f"fixed rate {args.rate} req/s ...", flush=True)
        # Alternated, twice each, the quieter run of each kept: a neighbour's burst on a
        # shared machine lands in one run (it once made the direct p99 40 ms), not in both.
        direct_runs, gateway_runs = [], []
        for _ in range(2):
            direct_runs.append(fixed_rate(upstream + "/users/42", {}, args.rate, 6))
            gateway_runs.append(fixed_rate(waitress_gateway + SMALL_PATH, gateway_headers,
                                           args.rate, 6))
        direct_fixed = min(direct_runs, key=lambda run: run["p99"])
        gateway_fixed = min(gateway_runs, key=lambda run: run["p99"])
        moved = None
        if not args.skip_transfers:
            print("1 GiB each way ...", flush=True)
            moved = transfers(waitress_gateway, gateway_headers,
                              int(urls["waitress"]["gateway_pid"]))
        layers = None
        if not args.skip_layers:
            print("per-layer costs (in-process) ...", flush=True)
            layers = layer_costs(upstream, token, gateway_env)
    finally:
        services.stop()

    def rps(server, kind):
        """The row's throughput; ``None`` for a failed row (not all answers 2xx)."""
        for row_server, row_kind, _, result in rows:
            if (row_server, row_kind) == (server, kind):
                return None if result["failed"] else result["rps"]
        return None

    def verdict(ok):
        return "met" if ok else "**not met**"

    lines = [
        f"# Benchmark {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {machine()}.",
        f"Upstream: {upstream_kind}. Load: `wrk -t1 -c16 -d{args.duration}s`, small JSON GET "
        f"(a valid token, an allowed Origin); every server with {args.threads} threads, one "
        f"process. All rows in this run: {args.rounds} interleaved rounds (every row once a "
        "round, the order reversed every other round); a row shows the medians of its runs, "
        "a ratio the median [min–max] of the ratios taken round by round. " + SHIPPED_NOTE,
        "",
        "| what | req/s | p50 ms | p99 ms | runs, req/s |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for _, _, label, result in rows:
        each = ", ".join(f"{value:,.0f}" for value in result.get("runs", [result["rps"]]))
        if result["failed"]:
            lines.append(f"| {label} | **{failed(result)}** | — | — | {each} |")
        else:
            lines.append(f"| {label} | {result['rps']:,.0f} | {result['p50']:.2f} | "
                         f"{result['p99']:.2f} | {each} |")
    lines += ["", "| target | measured | |", "| --- | --- | --- |"]
    targets = {"waitress": 0.80, "granian": 0.60, "gunicorn": None}
    ratios = {}
    for server in servers:
        gateway, stdlib, pooled = rps(server, "gateway"), rps(server, "stdlib"), rps(
            server, "urllib3")
        wanted = targets[server]
        goal = f" ≥ {wanted:.2f}" if wanted else " (reported)"
        if not (gateway and stdlib and pooled):
            lines.append(f"| {server}: full pipeline / stdlib pass-through{goal} | FAILED "
                         "(a row's answers were not all 2xx) | **not met** |")
            continue
        ratio, low, high = round_ratio(runs, server, "gateway", "stdlib")
        ratios[server] = ratio
        lines.append(f"| {server}: full pipeline / stdlib pass-through{goal} | "
                     f"{ratio:.2f} [{low:.2f}–{high:.2f}] (medians {gateway:,.0f} / "
                     f"{stdlib:,.0f}; urllib3 pass-through: "
                     f"{round_ratio(runs, server, 'gateway', 'urllib3')[0]:.2f}) | "
                     f"{verdict(ratio >= wanted) if wanted else ''} |")
    pinned, gateway = rps("waitress", "stdlib_pinned"), rps("waitress", "gateway")
    if "waitress" in servers and pinned and gateway:
        ratio, low, high = round_ratio(runs, "waitress", "gateway", "stdlib_pinned")
        lines.append(f"| waitress: full pipeline / stdlib pass-through both on one CPU "
                     f"(reported: the same conditions) | {ratio:.2f} [{low:.2f}–{high:.2f}] "
                     f"(medians {gateway:,.0f} / {pinned:,.0f}) | |")
    werkzeug, gateway = rps("waitress", "werkzeug"), rps("waitress", "gateway")
    if "waitress" in servers and werkzeug and gateway:
        ratio, low, high = round_ratio(runs, "waitress", "gateway", "werkzeug")
        lines.append(f"| waitress: full pipeline ahead of werkzeug's bare ProxyMiddleware | "
                     f"{ratio:.2f}× [{low:.2f}–{high:.2f}] (medians {gateway:,.0f} / "
                     f"{werkzeug:,.0f}) | {verdict(ratio > 1)} |")
    added_p50 = gateway_fixed["p50"] - direct_fixed["p50"]
    added_p99 = gateway_fixed["p99"] - direct_fixed["p99"]
    lines.append(f"| added latency at {args.rate} req/s (waitress; quieter of 2 runs of 6 s "
                 f"each), p99 ≤ 5 ms | "
                 f"p50 {added_p50:+.2f} ms, p99 {added_p99:+.2f} ms (direct p99 "
                 f"{direct_fixed['p99']:.2f}, gateway p99 {gateway_fixed['p99']:.2f}; "
                 f"non-2xx {gateway_fixed['non2xx']}) | "
                 f"{verdict(added_p99 <= 5 and not gateway_fixed['non2xx'])} |")
    if moved:
        down_ok = moved["down_bytes"] == TRANSFER and moved["down_rss_mib"] < 64
        up_ok = moved["up_status"] == 200 and moved["up_rss_mib"] < 64
        lines.append(f"| 1 GiB download through the gateway (waitress), RSS growth < 64 MiB | "
                     f"{moved['down_mb_s']:.0f} MB/s, +{moved['down_rss_mib']:.1f} MiB "
                     f"({moved['down_bytes']:,} bytes) | {verdict(down_ok)} |")
        lines.append(f"| 1 GiB upload through the gateway (waitress), RSS growth < 64 MiB | "
                     f"{moved['up_mb_s']:.0f} MB/s, +{moved['up_rss_mib']:.1f} MiB "
                     f"(status {moved['up_status']}) | {verdict(up_ok)} |")
    waitress_rps = rps("waitress", "gateway")
    lines.append("| reference: upstream direct / gateway on waitress | "
                 + (f"{direct['rps'] / waitress_rps:.1f}× | |" if waitress_rps
                    else "FAILED | |"))
    if layers:
        per, cost = layers["per_request_us"], layers["layer_cost_us"]
        lines += [
            "", "Per-layer cost, µs per request (`bench/layers.py`: in-process WSGI calls on "
            "one thread, each layer switched off in turn with the proxy replaced by a stub; "
            "proxy = full pipeline − stubbed pipeline − a bare `http.client` round trip; "
            "fastest of 12 interleaved rounds):", "",
            "| layer | µs/request |", "| --- | ---: |",
        ]
        for name in LAYER_ORDER:
            lines.append(f"| {name} | {cost[name]:.1f} |")
        lines += [
            f"| all layers but the proxy (stubbed pipeline) | {per['stubbed']:.1f} |",
            f"| full pipeline, in-process, real upstream | {per['full']:.1f} |",
            f"| bare `http.client` round trip to the upstream | {per['http.client']:.1f} |",
        ]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]
    lines += ["", f"Run time: {time.monotonic() - begun:.0f} s."]
    report = "\n".join(lines) + "\n"
    print()
    print(report)
    results.update(rows=[{"server": s, "kind": k, "label": lb, **r} for s, k, lb, r in rows],
                   ratios=ratios, fixed_rate={"direct": direct_fixed, "gateway": gateway_fixed},
                   transfers=moved, layers=layers, notes=notes)
    RESULTS.mkdir(exist_ok=True)
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    out = RESULTS / f"{stamp}.md"
    out.write_text(report, encoding="utf-8")
    (RESULTS / f"{stamp}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (RESULTS / "latest.md").write_text(report, encoding="utf-8")
    print(f"written to {out.relative_to(ROOT)} (and .json, latest.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
