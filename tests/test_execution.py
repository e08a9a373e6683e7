"""The sandbox in nanochat/execution.py, attacked the ways model-written code might go wrong:
loops, memory and fork bombs, deleting files, opening sockets, reading secrets, output floods.

Every hostile program here is bounded on its own (a fixed number of forks whose children exit at
once, a memory bomb under a small limit), so that a broken sandbox fails the test without taking
down the machine.
"""

import os
import platform
import socket
import sys
import time

import pytest

from nanochat.execution import MAX_OUTPUT_BYTES, ExecutionResult, execute_code

LINUX_WITH_SYSCALL_FILTER = sys.platform.startswith("linux") and platform.machine() in (
    "x86_64", "aarch64")


def landlock_available() -> bool:
    """Whether this kernel offers Landlock, which confines the sandbox's writes."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1)) >= 1


def processes_in_session(session_id: int) -> list[int]:
    """Live processes whose session is `session_id` (the sandbox is a session leader)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat_file:
                fields = stat_file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        state, session = fields[0], int(fields[3])
        if session == session_id and state != "Z":
            found.append(int(entry))
    return found


def test_normal_code_prints_and_succeeds():
    result = execute_code("import math\nprint('hello')\nprint(math.factorial(5))\n")
    assert result == ExecutionResult(success=True, stdout="hello\n120\n", stderr="",
                                     timed_out=False, memory_exceeded=False, error=None)


def test_working_directory_is_fresh_writable_and_removed():
    code = ("import os\n"
            "open('notes.txt', 'w').write('kept')\n"
            "print(os.getcwd())\n"
            "print(open('notes.txt').read())\n")
    first, second = execute_code(code), execute_code(code)
    assert first.success and second.success
    first_dir, first_text = first.stdout.split()
    assert first_text == "kept"
    assert first_dir != second.stdout.split()[0]
    assert not os.path.exists(first_dir)


def test_exception_gives_failure_with_traceback():
    result = execute_code("print('before')\ndef divide():\n    return 1 / 0\ndivide()\n")
    assert not result.success and not result.timed_out and not result.memory_exceeded
    assert result.stdout == "before\n"
    assert result.error == "ZeroDivisionError: division by zero"
    assert "Traceback" in result.stderr and "return 1 / 0" in result.stderr
    assert 'line 3, in divide' in result.stderr


def test_syntax_error_and_exit_status():
    syntax = execute_code("x = (")
    assert not syntax.success and syntax.error.startswith("SyntaxError")
    assert not execute_code("import sys; sys.exit(3)").success
    assert execute_code("import sys; sys.exit(0)").success


def test_infinite_loop_times_out_and_keeps_earlier_output():
    start = time.monotonic()
    result = execute_code("print('started')\nwhile True:\n    pass\n", timeout=1.0)
    elapsed = time.monotonic() - start
    assert result.timed_out and not result.success
    assert result.stdout == "started\n"
    assert elapsed < 1.0 + 1.5


def test_sleeping_code_is_killed_by_the_wall_clock():
    start = time.monotonic()
    result = execute_code("import time\ntime.sleep(60)\n", timeout=1.0)
    assert result.timed_out and time.monotonic() - start < 1.0 + 1.5


def test_memory_bomb_is_contained():
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024 * 1024))\n"
    result = execute_code(bomb, timeout=10.0, memory_limit_mb=128)
    assert result.memory_exceeded and not result.success
    assert result.error.startswith("MemoryError")
    single = execute_code("x = bytearray(1024 ** 3)", memory_limit_mb=128)
    assert single.memory_exceeded
    # The limit leaves room for honest work, and the parent carries on.
    fits = execute_code("x = bytearray(32 * 1024 * 1024)\nprint(len(x))", memory_limit_mb=128)
    assert fits.success and fits.stdout == f"{32 * 1024 * 1024}\n"


def test_fork_bomb_is_refused_and_leaves_no_processes():
    # Bounded: at most 20 children, each sleeping, all in the sandbox's session.
    bomb = (
        "import os, time\n"
        "print(os.getpid(), flush=True)\n"
        "for attempt in range(20):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as error:\n"
        "        print('refused', type(error).__name__)\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "else:\n"
        "    print('forked 20 times')\n"
    )
    result = execute_code(bomb, timeout=3.0)
    sandbox_pid, outcome = result.stdout.split("\n", 1)
    assert outcome == "refused PermissionError\n"
    if sys.platform.startswith("linux"):
        assert processes_in_session(int(sandbox_pid)) == []


@pytest.mark.parametrize("spawn", [
    "import posix; posix.fork()",
    "import os; os.system('true')",
    "import subprocess; subprocess.run(['true'])",
    "import os; os.posix_spawn('/bin/true', ['true'], {})",
    "import multiprocessing; multiprocessing.Process(target=print).start()",
])
def test_other_ways_to_start_processes_are_refused(spawn):
    # If one got through, it would run /bin/true or exit at once: harmless either way.
    result = execute_code(spawn)
    assert not result.success
    assert "PermissionError" in result.error


@pytest.mark.skipif(not LINUX_WITH_SYSCALL_FILTER, reason="the system-call filter is Linux-only")
def test_kernel_refuses_fork_when_python_guards_are_bypassed():
    # Undo the ctypes import block and call the C library's fork directly; should it succeed,
    # the child exits at once.
    code = (
        "import sys\n"
        "for name in ('ctypes', '_ctypes'):\n"
        "    sys.modules.pop(name, None)\n"
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "pid = libc.fork()\n"
        "if pid == 0:\n"
        "    libc._exit(0)\n"
        "print(pid, ctypes.get_errno())\n"
    )
    result = execute_code(code)
    assert result.success
    pid, error_number = result.stdout.split()
    assert pid == "-1" and int(error_number) in (1, 11)  # EPERM (filter) or EAGAIN (NPROC)


def test_files_outside_the_sandbox_survive(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    code = (
        "import os, pathlib, shutil\n"
        f"path = {str(victim)!r}\n"
        "attacks = [lambda: os.remove(path), lambda: os.unlink(path),\n"
        "           lambda: pathlib.Path(path).unlink(), lambda: shutil.rmtree(os.path.dirname(path)),\n"
        "           lambda: os.rename(path, path + '.moved'), lambda: os.truncate(path, 0),\n"
        "           lambda: os.chmod(path, 0)]\n"
        "for attack in attacks:\n"
        "    try:\n"
        "        attack()\n"
        "        print('done')\n"
        "    except OSError:\n"
        "        print('refused')\n"
    )
    result = execute_code(code)
    assert result.stdout.split() == ["refused"] * 7
    assert victim.read_text() == "precious"
    assert (victim.stat().st_mode & 0o777) != 0


@pytest.mark.skipif(not landlock_available(), reason="needs Landlock to confine plain writes")
def test_overwriting_a_file_outside_the_sandbox_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    result = execute_code(f"open({str(victim)!r}, 'w').write('gone')")
    assert not result.success and "PermissionError" in result.error
    assert victim.read_text() == "precious"


def test_socket_to_localhost_fails():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        "attempts = [lambda: socket.socket(),\n"
        f"            lambda: socket.create_connection(('127.0.0.1', {port}), timeout=1),\n"
        "            lambda: socket.socketpair(),\n"
        "            lambda: __import__('_socket').socket()]\n"
        "for attempt in attempts:\n"
        "    try:\n"
        "        attempt()\n"
        "        print('connected')\n"
        "    except OSError:\n"
        "        print('refused')\n"
    )
    try:
        result = execute_code(code)
        assert result.stdout.split() == ["refused"] * 4
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


@pytest.mark.skipif(not LINUX_WITH_SYSCALL_FILTER, reason="the system-call filter is Linux-only")
def test_kernel_refuses_sockets_when_python_guards_are_bypassed():
    code = (
        "import sys\n"
        "for name in ('ctypes', '_ctypes'):\n"
        "    sys.modules.pop(name, None)\n"
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.socket(2, 1, 0))\n"  # AF_INET, SOCK_STREAM
    )
    assert execute_code(code).stdout == "-1\n"


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    code = (
        "import os\n"
        "print(os.environ.get('NANOCHAT_TEST_SECRET'))\n"
        "print(b'hunter2' in open('/proc/self/environ', 'rb').read())\n"
    )
    result = execute_code(code)
    assert result.stdout == "None\nFalse\n"


@pytest.mark.skipif(not landlock_available(), reason="needs Landlock to hide other processes")
def test_parent_environment_is_not_readable_through_proc(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = execute_code("import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())")
    assert not result.success and "PermissionError" in result.error
    assert "hunter2" not in result.stdout


def test_huge_output_is_capped():
    result = execute_code("import sys\nprint('x' * 1_000_000)\nsys.stderr.write('e' * 1_000_000)\n")
    assert result.success
    assert result.stdout.startswith("x" * MAX_OUTPUT_BYTES)
    # 1,000,000 characters and a newline, of which the first 65,536 bytes are kept.
    assert result.stdout.endswith("x\n[output truncated: 934465 more bytes not shown]\n")
    assert result.stderr.endswith("e\n[output truncated: 934464 more bytes not shown]\n")
    assert len(result.stdout) < MAX_OUTPUT_BYTES + 100
    small = execute_code("print('y' * 100)", max_output_bytes=10)
    assert small.stdout == "yyyyyyyyyy\n[output truncated: 91 more bytes not shown]\n"


def test_endless_output_is_capped_and_timed_out():
    result = execute_code("while True:\n    print('z' * 1000)\n", timeout=1.0)
    assert result.timed_out
    assert result.stdout.startswith("z" * 1000) and len(result.stdout) < MAX_OUTPUT_BYTES + 100


def test_invalid_arguments_are_explained():
    with pytest.raises(ValueError, match="timeout"):
        execute_code("pass", timeout=0)
    with pytest.raises(ValueError, match="memory_limit_mb"):
        execute_code("pass", memory_limit_mb=1)
    with pytest.raises(TypeError, match="str"):
        execute_code(b"print(1)")


def test_concurrent_calls_from_threads_do_not_mix():
    # Ray Serve replicas and rollout actors call the sandbox from several threads at once.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda n: execute_code(f"print({n} * {n})"), range(8)))
    assert [result.stdout for result in results] == [f"{n * n}\n" for n in range(8)]


def test_runs_inside_a_ray_worker(ray_local):
    @ray_local.remote
    def run_in_worker(code, timeout):
        return execute_code(code, timeout=timeout)

    ok, looping = ray_local.get([run_in_worker.remote("print(6 * 7)", 5.0),
                                 run_in_worker.remote("while True:\n    pass\n", 1.0)])
    assert ok.success and ok.stdout == "42\n"
    assert looping.timed_out and not looping.success
