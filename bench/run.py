"""Benchmark the gateway against reference points measured in the same run.

``python bench/run.py [--duration 10] [--threads 8] [--skip-gunicorn]``

Starts, all on loopback: a fast upstream (nginx when installed, else ``fastupstream.py``),
nginx as a reverse proxy (when installed), waitress serving a hello app, the minimal
pass-throughs on urllib3 (the gateway's client) and on requests (``passthrough.py``),
with an allowed Origin, rate limiting with a limit that never triggers, JWT verification of a
valid token, routing, proxy) under waitress, and the same under gunicorn with 2 workers.
Measures with ``wrk -t1 -c16`` (Debian package ``wrk``), a fixed-rate open-loop client for
added latency, and 200 MB transfers for throughput and the gateway's peak memory. Prints a
Markdown table and writes it to ``bench/results/``.
"""
from __future__ import annotations

import argparse
import datetime as dt
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

import jwt
import requests

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
ORIGIN = "https://app.meetinity.test"
SMALL_PATH = "/api/users/42"
TRANSFER = 200 * 1000 * 1000
OLD_GATEWAY_RPS = 1100  # the earlier Flask gateway, 2 gunicorn workers (issue's table)


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

    def start(self, args, port, env=None, **kw) -> subprocess.Popen:
        full_env = dict(os.environ)
        full_env.update(env or {})
        process = subprocess.Popen(args, env=full_env, cwd=str(ROOT),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        self.processes.append(process)
        wait_port(port, process)
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
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)

    def percentile(p):
        match = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {"rps": rps, "p50": percentile(50), "p99": percentile(99),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "errors": errors.group(1) if errors else ""}


def fixed_rate(url: str, headers: dict[str, str], rate: int, duration: int) -> dict:
    """Open-loop load: requests scheduled at ``rate``/s; latency measured from the schedule
    (so a stall counts for every request it delays, no coordinated omission)."""
    workers = 8
    latencies: list[float] = []
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
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return {"p50": statistics.median(latencies),
            "p99": latencies[int(len(latencies) * 0.99) - 1]}


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
    with client.get(gateway_url + f"/api/users/download?size={TRANSFER}", headers=headers,
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
    response = client.post(gateway_url + "/api/users/upload", data=Body(), timeout=300,
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
            f"requests {version('requests')}, urllib3 {version('urllib3')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=8, help="waitress threads")
    parser.add_argument("--rate", type=int, default=300, help="fixed rate, requests/s")
    parser.add_argument("--skip-gunicorn", action="store_true")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")

    services = Services()
    ports = {name: free_port() for name in
             ("upstream", "nginx_proxy", "hello", "urllib3", "requests", "gateway", "gunicorn")}
    secret = secrets.token_urlsafe(48)
    now = int(time.time())
    token = jwt.encode({"sub": 42, "email": "ada@example.com", "iat": now,
                        "exp": now + 3600}, secret, algorithm="HS256")
    gateway_headers = {"Authorization": f"Bearer {token}", "Origin": ORIGIN}
    gateway_env = {
        "JWT_SECRET": secret, "CORS_ORIGINS": ORIGIN,
        "RATE_LIMIT_DEFAULT": "100000000/minute", "RATE_LIMIT_AUTH": "100000000/minute",
        "RATE_LIMIT_USERS": "100000000/minute",  # one token: the per-user limit would bite
        "MAX_BODY_SIZE": "300M", "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"),
        "GATEWAY_CONFIG": str(ROOT / "gateway.ini"),
    }
    rows = []
    notes = []
    try:
        if shutil.which("nginx"):
            upstream_kind = start_nginx(services, ports["upstream"], ports["nginx_proxy"])
        else:
            upstream_kind = "bench/fastupstream.py (asyncio; nginx not installed)"
            services.start([sys.executable, str(BENCH / "fastupstream.py"), "127.0.0.1",
                            str(ports["upstream"])], ports["upstream"])
        upstream = f"http://127.0.0.1:{ports['upstream']}"
        gateway_env["USER_SERVICE_URL"] = upstream
        py = sys.executable
        threads = str(args.threads)
        services.start([py, "-c", "import sys; from meetinity_gateway.cli import create_server;"
                        "app = lambda e, s: (s('200 OK', [('Content-Type', 'text/plain'),"
                        "('Content-Length', '5')]), [b'hello'])[1];"
                        f"create_server(app, listen='127.0.0.1:{ports['hello']}',"
                        f" threads={threads}).run()"], ports["hello"])
        for client in ("urllib3", "requests"):
            services.start([py, str(BENCH / "passthrough.py"), client, upstream,
                            f"127.0.0.1:{ports[client]}", threads], ports[client])
        gateway = services.start(
            [py, "-m", "meetinity_gateway", "serve", "--listen",
             f"127.0.0.1:{ports['gateway']}", "--threads", threads],
            ports["gateway"], env=gateway_env)
        gateway_url = f"http://127.0.0.1:{ports['gateway']}"
        check = requests.get(gateway_url + SMALL_PATH, headers=gateway_headers, timeout=5)
        if check.status_code != 200 or check.headers.get("Access-Control-Allow-Origin") != ORIGIN:
            raise RuntimeError(f"gateway check failed: {check.status_code} {check.text[:200]}")

        def measure(label, url, headers=None):
            result = wrk(url, args.duration, headers or {})
            rows.append((label, result))
            print(f"{label}: {result['rps']:.0f} req/s, p50 {result['p50']:.2f} ms, "
                  f"p99 {result['p99']:.2f} ms", flush=True)
            if result["non2xx"] or result["errors"]:
                notes.append(f"{label}: {result['non2xx']} non-2xx, errors {result['errors']}")
            return result

        direct = measure("upstream direct", upstream + "/users/42")
        if shutil.which("nginx"):
            measure("nginx reverse proxy", f"http://127.0.0.1:{ports['nginx_proxy']}/users/42")
        measure("waitress hello app", f"http://127.0.0.1:{ports['hello']}/")
        minimal = measure("minimal pass-through (waitress + urllib3, the gateway's client)",
                          f"http://127.0.0.1:{ports['urllib3']}/users/42")
        with_requests = measure("minimal pass-through (waitress + requests.Session)",
                                f"http://127.0.0.1:{ports['requests']}/users/42")
        full = measure("**gateway, full pipeline** (waitress)", gateway_url + SMALL_PATH,
                       gateway_headers)
        gunicorn = None
        if not args.skip_gunicorn and shutil.which("gunicorn") and os.name == "posix":
            services.start(["gunicorn", "-w", "2", "-k", "gthread", "--threads", threads,
                            "-b", f"127.0.0.1:{ports['gunicorn']}", "--log-level", "warning",
                            "meetinity_gateway.wsgi:application"],
                           ports["gunicorn"], env=gateway_env)
            gunicorn = measure("gateway, full pipeline (gunicorn, 2 workers)",
                               f"http://127.0.0.1:{ports['gunicorn']}{SMALL_PATH}",
                               gateway_headers)

        print(f"fixed rate {args.rate} req/s ...", flush=True)
        direct_fixed = fixed_rate(upstream + "/users/42", {}, args.rate, args.duration)
        gateway_fixed = fixed_rate(gateway_url + SMALL_PATH, gateway_headers, args.rate,
                                   args.duration)
        print("200 MB transfers ...", flush=True)
        moved = transfers(gateway_url, gateway_headers, gateway.pid)
    finally:
        services.stop()

    ratio = full["rps"] / minimal["rps"]
    added_p50 = gateway_fixed["p50"] - direct_fixed["p50"]
    added_p99 = gateway_fixed["p99"] - direct_fixed["p99"]

    def verdict(ok):
        return "met" if ok else "**not met**"

    lines = [
        f"# Benchmark {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {machine()}.",
        f"Upstream: {upstream_kind}. Load: `wrk -t1 -c16 -d{args.duration}s`, small JSON GET; "
        f"servers with {args.threads} threads.",
        "",
        "| what | req/s | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, result in rows:
        lines.append(f"| {label} | {result['rps']:,.0f} | {result['p50']:.2f} | "
                     f"{result['p99']:.2f} |")
    lines += [
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
        f"| full pipeline / minimal pass-through on the same client (urllib3) ≥ 0.85 | "
        f"{ratio:.2f} | {verdict(ratio >= 0.85)} |",
        f"| full pipeline / minimal pass-through on requests.Session | "
        f"{full['rps'] / with_requests['rps']:.2f} | |",
        f"| full pipeline per process ≥ {OLD_GATEWAY_RPS:,} req/s (old gateway, 2 gunicorn "
        f"workers; quoted, not re-measured) | {full['rps']:,.0f} "
        f"({full['rps'] / OLD_GATEWAY_RPS:.2f}×) | {verdict(full['rps'] >= OLD_GATEWAY_RPS)} |",
        f"| added latency at {args.rate} req/s, p99 ≤ 5 ms | p50 +{added_p50:.2f} ms, "
        f"p99 +{added_p99:.2f} ms (direct p99 {direct_fixed['p99']:.2f}, gateway p99 "
        f"{gateway_fixed['p99']:.2f}) | {verdict(added_p99 <= 5)} |",
        f"| 200 MB download: < 64 MiB peak growth, ≥ 100 MB/s | {moved['down_mb_s']:.0f} MB/s, "
        f"+{moved['down_rss_mib']:.1f} MiB | "
        f"{verdict(moved['down_mb_s'] >= 100 and moved['down_rss_mib'] < 64)} |",
        f"| 200 MB upload: < 64 MiB peak growth, ≥ 100 MB/s | {moved['up_mb_s']:.0f} MB/s, "
        f"+{moved['up_rss_mib']:.1f} MiB (status {moved['up_status']}) | "
        f"{verdict(moved['up_mb_s'] >= 100 and moved['up_rss_mib'] < 64)} |",
    ]
    if gunicorn:
        lines.append(f"| scale on one host: gunicorn 2 workers / waitress 1 process | "
                     f"{gunicorn['rps'] / full['rps']:.2f}× | |")
    lines.append(f"| reference: upstream direct / gateway | {direct['rps'] / full['rps']:.1f}× | |")
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]
    report = "\n".join(lines) + "\n"
    print()
    print(report)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{dt.datetime.now():%Y%m%d-%H%M%S}.md"
    out.write_text(report, encoding="utf-8")
    (RESULTS / "latest.md").write_text(report, encoding="utf-8")
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
