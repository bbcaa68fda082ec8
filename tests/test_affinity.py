"""``[server:main] cpu_affinity``: every thread of a serving process on one CPU.

The setting's grammar (a property test), the choice of CPU, pinning every thread of a real
process, and the shipped gateway under ``meetinity-gateway serve`` read back from
``/proc/PID/task/*/status`` (Linux: the only place the threads' CPUs can be read).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meetinity_gateway.config import as_cpu_affinity
from meetinity_gateway.serving import affinity
from meetinity_gateway.settings import DEFAULTS, server_settings
from tests.conftest import wait_until
from tests.servers import TEST_JWT_SECRET, GatewayProcess, free_port, session, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or not Path("/proc/self/task").is_dir(),
    reason="CPU affinity of each thread is set and read through Linux' sched_setaffinity "
           "and /proc (Windows sets the process mask instead)")


def threads_cpus(pid: int) -> dict[int, str]:
    """Each thread of ``pid``: its allowed CPUs as /proc lists them (``0``, ``0-1``)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out[int(task.name)] = line.split(":", 1)[1].strip()
    return out


# -- the setting -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("auto", "auto"), (" AUTO ", "auto"), ("off", "off"), ("none", "off"), ("false", "off"),
    ("0", frozenset({0})), ("3", frozenset({3})), ("0,2", frozenset({0, 2})),
    ("2-4", frozenset({2, 3, 4})), ("0, 2-3", frozenset({0, 2, 3})), ("1-1", frozenset({1})),
])
def test_the_setting_reads_auto_off_and_cpu_lists(text, value):
    assert as_cpu_affinity(text) == value


@pytest.mark.parametrize("text", ["", "yes", "-1", "1-", "-", "3-1", "0,,1", "0.5", "a-b",
                                  "1 2", "0-100000", "9" * 40])
def test_a_bad_setting_is_a_value_error(text):
    with pytest.raises(ValueError):
        as_cpu_affinity(text)


@settings(max_examples=300, deadline=None, print_blob=True)
@given(st.text(max_size=24))
def test_any_text_is_a_setting_or_a_value_error(text):
    try:
        value = as_cpu_affinity(text)
    except ValueError:
        return
    assert value in ("auto", "off") or (
        isinstance(value, frozenset) and value and all(cpu >= 0 for cpu in value))


@settings(max_examples=200, deadline=None, print_blob=True)
@given(st.sets(st.integers(0, 511), min_size=1, max_size=12))
def test_a_written_cpu_list_reads_back(cpus):
    assert as_cpu_affinity(",".join(map(str, sorted(cpus)))) == cpus


def test_the_server_section_defaults_to_auto_and_names_a_bad_value():
    assert DEFAULTS["cpu_affinity"] == "auto"
    assert server_settings({})["cpu_affinity"] == "auto"
    assert server_settings({"cpu_affinity": "1-2"})["cpu_affinity"] == frozenset({1, 2})
    with pytest.raises(ValueError) as info:
        server_settings({"cpu_affinity": "half"})
    assert "cpu_affinity" in str(info.value)


# -- the choice ------------------------------------------------------------------------------

def test_auto_picks_one_allowed_cpu_by_pid_so_that_processes_spread():
    allowed = frozenset({1, 4, 6})
    picked = [affinity.choose("auto", allowed, pid) for pid in range(6)]
    assert all(len(cpus) == 1 and cpus <= allowed for cpus in picked)
    assert set().union(*picked) == allowed  # consecutive pids cover every allowed CPU


@pytest.mark.parametrize("setting, allowed", [
    ("auto", frozenset({0})),      # one CPU: nothing to gain
    ("auto", None),                # the platform cannot say
    ("off", frozenset({0, 1})),
])
def test_no_pin_where_it_buys_nothing_or_is_not_asked_for(setting, allowed):
    assert affinity.choose(setting, allowed, 12345) is None


def test_a_cpu_list_is_taken_as_written():
    assert affinity.choose(frozenset({2, 3}), frozenset({0, 1}), 7) == {2, 3}


# -- pinning a real process ------------------------------------------------------------------

@linux_only
def test_every_thread_of_a_process_is_pinned_and_later_threads_inherit_it():
    cpu = min(os.sched_getaffinity(0))
    script = textwrap.dedent(f"""
        import json, os, threading
        from meetinity_gateway.serving import affinity
        stop = threading.Event()
        early = [threading.Thread(target=stop.wait) for _ in range(3)]
        for thread in early:
            thread.start()
        pinned = affinity.pin({{{cpu}}})
        late = threading.Thread(target=stop.wait)
        late.start()
        tids = [int(name) for name in os.listdir("/proc/self/task")]
        print(json.dumps({{"pinned": pinned,
                          "cpus": [sorted(os.sched_getaffinity(tid)) for tid in tids]}}))
        stop.set()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["pinned"] == 4  # the main thread and the three started before
    assert len(result["cpus"]) == 5 and all(cpus == [cpu] for cpus in result["cpus"])


@linux_only
def test_a_pin_the_system_refuses_is_a_warning_and_nothing_changes(caplog):
    before = os.sched_getaffinity(0)
    with caplog.at_level("WARNING", logger="meetinity_gateway.server"):
        assert affinity.apply(frozenset({4095})) is None
    assert os.sched_getaffinity(0) == before
    assert "could not pin the server to CPU 4095" in caplog.text


# -- the shipped gateway ---------------------------------------------------------------------

@linux_only
def test_the_shipped_gateway_runs_every_thread_on_one_cpu(tmp_path):
    allowed = os.sched_getaffinity(0)
    log = tmp_path / "gateway.log"
    proc = GatewayProcess(env={"USER_SERVICE_URL": "http://127.0.0.1:9",
                               "JWT_SECRET": TEST_JWT_SECRET}, log=log)
    try:
        assert session().get(proc.url + "/health/live", timeout=10).status_code == 200
        cpus = threads_cpus(proc.process.pid)
        assert len(cpus) >= 5  # the main (I/O) thread and the 4 workers at least
        if len(allowed) >= 2:
            expected = str(sorted(allowed)[proc.process.pid % len(allowed)])
            assert set(cpus.values()) == {expected}, cpus
            wait_until(lambda: f"server threads on CPU {expected}" in log.read_text(),
                       what="the start-up line on the pin")
        else:  # one CPU: nothing to pin, nothing said
            assert "server threads on CPU" not in log.read_text()
    finally:
        proc.stop()


@linux_only
def test_cpu_affinity_off_leaves_the_threads_where_the_system_puts_them(tmp_path):
    allowed = os.sched_getaffinity(0)
    log = tmp_path / "gateway.log"
    proc = GatewayProcess(env={"USER_SERVICE_URL": "http://127.0.0.1:9",
                               "JWT_SECRET": TEST_JWT_SECRET, "GATEWAY_CPU_AFFINITY": "off"},
                          log=log)
    try:
        assert session().get(proc.url + "/health/live", timeout=10).status_code == 200
        ours = threads_cpus(os.getpid())[os.getpid()]
        assert set(threads_cpus(proc.process.pid).values()) == {ours}
        assert len(allowed) == 1 or "-" in ours or "," in ours
        assert "server threads on CPU" not in log.read_text()
    finally:
        proc.stop()


def test_a_bad_cpu_affinity_stops_serve_with_a_configuration_error():
    env = dict(os.environ, JWT_SECRET=TEST_JWT_SECRET, GATEWAY_CPU_AFFINITY="banana")
    done = subprocess.run(
        [sys.executable, "-m", "meetinity_gateway", "serve", "--listen", "127.0.0.1:0"],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "configuration error" in done.stderr and "cpu_affinity" in done.stderr
    assert "banana" in done.stderr


@linux_only
@pytest.mark.parametrize("server", ["gunicorn"])
def test_each_worker_process_of_gunicorn_pins_itself(server, tmp_path):
    """``serve --server NAME``: the master is left alone, the worker runs every thread on the
    pid mod n-th allowed CPU once it has loaded the pipeline (several workers spread by pid:
    see the test of ``choose``; two would need Redis for their shared limits)."""
    import importlib.util

    if importlib.util.find_spec(server) is None:
        pytest.skip(f"{server} is not installed (an optional extra)")
    allowed = sorted(os.sched_getaffinity(0))
    log = tmp_path / "gateway.log"
    port = free_port()
    with log.open("wb") as sink:
        master = subprocess.Popen(
            [sys.executable, "-m", "meetinity_gateway", "serve", "--server", server,
             "--workers", "1", "--threads", "2", "--listen", f"127.0.0.1:{port}"],
            env=dict(os.environ, JWT_SECRET=TEST_JWT_SECRET, LOG_LEVEL="INFO",
                     USER_SERVICE_URL="http://127.0.0.1:9"),
            cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=sink)
        try:
            wait_for_port("127.0.0.1", port, timeout=30, process=master)
            wait_until(lambda: "server threads on CPU" in log.read_text(errors="replace")
                       or len(allowed) < 2, timeout=30, what="the worker pinned")
            lines = [json.loads(line) for line in log.read_text().splitlines()
                     if "server threads on CPU" in line]
            if len(allowed) < 2:
                assert lines == []
                return
            assert len(lines) == 1, lines
            for line in lines:
                pid = int(line["message"].rsplit("pid ", 1)[1].rstrip(")"))
                assert pid != master.pid
                expected = str(allowed[pid % len(allowed)])
                assert set(threads_cpus(pid).values()) == {expected}
            ours = threads_cpus(os.getpid())[os.getpid()]
            assert set(threads_cpus(master.pid).values()) == {ours}  # the master: left alone
        finally:
            master.terminate()
            try:
                master.wait(30)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait(10)


@linux_only
def test_granian_is_left_where_the_system_puts_it(tmp_path):
    """Pinned, granian's worker exits at a stop before the access line of a request that
    finished during the drain is written (test_server_recipes): not pinned, by design."""
    pytest.importorskip("granian")
    log = tmp_path / "gateway.log"
    port = free_port()
    with log.open("wb") as sink:
        master = subprocess.Popen(
            [sys.executable, "-m", "meetinity_gateway", "serve", "--server", "granian",
             "--threads", "2", "--listen", f"127.0.0.1:{port}"],
            env=dict(os.environ, JWT_SECRET=TEST_JWT_SECRET, LOG_LEVEL="INFO",
                     USER_SERVICE_URL="http://127.0.0.1:9"),
            cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=sink)
        try:
            wait_for_port("127.0.0.1", port, timeout=30, process=master)
            assert session().get(f"http://127.0.0.1:{port}/health/live",
                                 timeout=10).status_code == 200
            ours = threads_cpus(os.getpid())[os.getpid()]
            workers = [int(pid) for pid in subprocess.run(
                ["pgrep", "-P", str(master.pid)], capture_output=True, text=True
            ).stdout.split()] if Path("/usr/bin/pgrep").exists() else []
            for pid in [master.pid, *workers]:
                assert set(threads_cpus(pid).values()) == {ours}
            assert "server threads on CPU" not in log.read_text(errors="replace")
        finally:
            master.terminate()
            try:
                master.wait(30)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait(10)
