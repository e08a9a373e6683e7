"""The sandbox in nanochat/execution.py, attacked the ways model-written code might go wrong:
loops, memory and fork bombs, deleting files, opening sockets, reading secrets, output floods.

The escapes that only the kernel can stop (reading or listing outside the sandbox, writing there,
sockets, fork, exec) are each tried twice: in plain Python, going around the Python guard where
there is one without ctypes (the original socket class, a fresh copy of the posix module), and
through the C library after re-importing ctypes, which undoes the Python guards. Both must fail
with the kernel's error number.

Every hostile program here is bounded on its own (a fixed number of forks whose children exit at
once, a memory bomb under a small limit), so that a broken sandbox fails the test without taking
down the machine.
"""

import errno
import json
import os
import platform
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from nanochat.execution import (MAX_OUTPUT_BYTES, SANDBOX_LAYERS, ExecutionResult,
                                 SandboxUnavailableError, execute_code)

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
                                     timed_out=False, memory_exceeded=False, error=None,
                                     layers=result.layers)


def test_humaneval_style_answers_using_the_standard_library_pass():
    # The modules HumanEval answers import, loaded lazily after the sandbox is in place.
    code = textwrap.dedent("""
        import collections, functools, heapq, itertools, math, re, string
        from typing import Dict, List, Optional, Tuple

        def words(text: str) -> List[str]:
            return re.findall(r"[a-z]+", text.lower())

        def most_common(text: str) -> Optional[Tuple[str, int]]:
            counts: Dict[str, int] = collections.Counter(words(text))
            return max(counts.items(), key=lambda item: (item[1], item[0])) if counts else None

        @functools.lru_cache(maxsize=None)
        def fib(n: int) -> int:
            return n if n < 2 else fib(n - 1) + fib(n - 2)

        def k_smallest(numbers: List[int], k: int) -> List[int]:
            return heapq.nsmallest(k, numbers)

        def check():
            assert words("Hello, World!") == ["hello", "world"]
            assert most_common("a b a c") == ("a", 2)
            assert fib(30) == 832040
            assert k_smallest([5, 1, 4, 2], 2) == [1, 2]
            assert list(itertools.accumulate([1, 2, 3])) == [1, 3, 6]
            assert math.isclose(math.sqrt(2) ** 2, 2.0)
            assert string.ascii_lowercase.index("e") == 4
            assert functools.reduce(lambda a, b: a * b, range(1, 6)) == 120

        check()
        print("ok")
    """)
    result = execute_code(code)
    assert result.success, result.stderr
    assert result.stdout == "ok\n"


def test_each_result_reports_the_layers_in_force():
    # The program writes a report of its own onto the status pipe (its descriptor is in argv):
    # the bootstrap's report comes first and is the one that counts.
    forged = json.dumps({"layers": dict.fromkeys(SANDBOX_LAYERS, False)})
    result = execute_code(f"import os, sys\nos.write(int(sys.argv[2]), b'{forged}\\n')")
    assert list(result.layers) == list(SANDBOX_LAYERS)
    if sys.platform.startswith("linux"):
        assert result.layers["landlock_read"] == result.layers["landlock_write"] == (
            landlock_available())
        assert result.layers["seccomp"] == LINUX_WITH_SYSCALL_FILTER
        assert result.layers["rlimits"]
    assert result.missing_layers == [name for name in SANDBOX_LAYERS if not result.layers[name]]
    # A program that never gets to report its end still has its layers reported.
    assert execute_code("while True:\n    pass\n", timeout=1.0).layers == result.layers


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


# Each escape as (Python attempt, C attempt): the Python one raises OSError, the C one returns -1
# or NULL, when the kernel refuses. They may use PATH (the target) and, in C, libc and ctypes.
FRESH_POSIX = ("import _imp, importlib.machinery\n"
               "posix = _imp.create_builtin(importlib.machinery.ModuleSpec('posix', None))\n"
               "_imp.exec_builtin(posix)\n")
ESCAPES = {
    "read a file outside": ("open(PATH, 'rb').read()", "libc.open(PATH.encode(), os.O_RDONLY)"),
    "list a directory outside": ("os.listdir(PATH)", "libc.opendir(PATH.encode())"),
    "write a file outside": ("open(PATH, 'w').write('x')",
                             "libc.open(PATH.encode(), os.O_WRONLY | os.O_CREAT, 0o644)"),
    "open a socket": ("import socket\nsocket.socket.__mro__[-2](socket.AF_INET, socket.SOCK_STREAM)",
                      "libc.socket(2, 1, 0)"),  # AF_INET, SOCK_STREAM
    # Should a fork get through, the child exits at once; should an exec, it runs /bin/true.
    "fork": (FRESH_POSIX + "if posix.fork() == 0:\n    posix._exit(0)",
             "pid = libc.fork()\nif pid == 0:\n    libc._exit(0)\npid"),
    "exec": (FRESH_POSIX + "posix.execv(PATH, [PATH])",
             "libc.execv(PATH.encode(), (ctypes.c_char_p * 2)(PATH.encode(), None))"),
}
CTYPES_REIMPORT = ("import sys\n"
                   "for name in ('ctypes', '_ctypes', 'ctypes.util'):\n"
                   "    sys.modules.pop(name, None)\n"
                   "import ctypes\n"
                   "libc = ctypes.CDLL(None, use_errno=True)\n"
                   "libc.opendir.restype = ctypes.c_void_p\n")


def attempt(escape: str, way: str, path: str = "") -> int | None:
    """Run one escape in the sandbox: the errno it failed with, or None when it got through."""
    python_attempt, c_attempt = ESCAPES[escape]
    if way == "python":
        body = (f"try:\n{textwrap.indent(python_attempt, '    ')}\n    print('escaped')\n"
                "except OSError as error:\n    print(error.errno)\n")
    else:
        *setup, call = c_attempt.split("\n")
        body = (CTYPES_REIMPORT + "\n".join(setup) + f"\nresult = {call}\n"
                "print(ctypes.get_errno() if result in (-1, None) else 'escaped')\n")
    result = execute_code(f"import os\nPATH = {path!r}\n" + body)
    assert result.success, result.stderr
    return None if result.stdout == "escaped\n" else int(result.stdout)


needs_landlock = pytest.mark.skipif(not landlock_available(),
                                    reason="this kernel has no Landlock to confine file access")
needs_syscall_filter = pytest.mark.skipif(
    not LINUX_WITH_SYSCALL_FILTER, reason="the system-call filter is Linux on x86_64 or aarch64 only")
BOTH_WAYS = pytest.mark.parametrize("way", ["python", "ctypes"])


# Home folders (the test's own, root's), the rest of /tmp and /etc, another process, the users.
OUTSIDE = [("list a directory outside", path) for path in
           dict.fromkeys([os.path.expanduser("~"), "/root", "/tmp", "/etc"])]
OUTSIDE += [("read a file outside", path) for path in ["/proc/1/cmdline", "/etc/passwd"]]


@needs_landlock
@BOTH_WAYS
@pytest.mark.parametrize("escape, path", OUTSIDE)
def test_homes_system_folders_and_other_processes_cannot_be_read(way, escape, path):
    assert attempt(escape, way, path) == errno.EACCES


@needs_landlock
@BOTH_WAYS
def test_a_file_outside_the_sandbox_can_be_neither_read_nor_written(way, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    assert attempt("read a file outside", way, str(victim)) == errno.EACCES
    assert attempt("write a file outside", way, str(victim)) == errno.EACCES
    assert attempt("write a file outside", way, str(tmp_path / "new.txt")) == errno.EACCES
    assert victim.read_text() == "precious" and not (tmp_path / "new.txt").exists()


@needs_syscall_filter
@BOTH_WAYS
def test_the_kernel_refuses_sockets(way):
    assert attempt("open a socket", way) == errno.EPERM


@needs_syscall_filter
@BOTH_WAYS
def test_the_kernel_refuses_fork(way):
    # EPERM from the system-call filter. Not EAGAIN: RLIMIT_NPROC=0 also refuses a fork, but only
    # for a user other than root, so a filter that let clone through would pass unseen elsewhere.
    assert attempt("fork", way) == errno.EPERM


@needs_syscall_filter
@BOTH_WAYS
def test_the_kernel_refuses_exec(way):
    # EPERM from the filter; EACCES from Landlock, which grants no execute right anywhere.
    assert attempt("exec", way, "/bin/true") in (errno.EPERM, errno.EACCES)


@needs_landlock
def test_what_the_sandbox_may_read():
    code = textwrap.dedent("""
        import os
        open('mine.txt', 'w').write('mine')
        print(open('mine.txt').read(), os.listdir('.'))
        print(open('/proc/self/status').read().startswith('Name:'), len(os.listdir('/proc/self/fd')) > 0)
        print(open(os.devnull, 'w').write('gone'), len(open('/dev/urandom', 'rb').read(8)))
        import hashlib, sqlite3
        print(hashlib.sha256(b'').hexdigest()[:8], sqlite3.connect(':memory:').execute('select 2').fetchone())
    """)
    result = execute_code(code)
    assert result.success, result.stderr
    assert result.stdout == "mine ['mine.txt']\nTrue True\n4 8\ne3b0c442 (2,)\n"


# A process in which the kernel answers landlock_create_ruleset with ENOSYS, as one without
# Landlock does (a seccomp filter that the sandboxed children inherit), runs the sandbox.
WITHOUT_LANDLOCK = textwrap.dedent("""
    import ctypes, sys
    from nanochat.execution import SandboxUnavailableError, execute_code

    class Instruction(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]

    # Load the call number; landlock_create_ruleset (444)? ENOSYS (38); otherwise allow.
    code = (Instruction * 4)(Instruction(0x20, 0, 0, 0), Instruction(0x15, 0, 1, 444),
                             Instruction(0x06, 0, 0, 0x00050000 | 38), Instruction(0x06, 0, 0, 0x7FFF0000))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    assert libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(Program(4, code)), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) == 0
    marker = sys.argv[1]
    for _ in range(2):
        result = execute_code("print('ran')")
        print(result.stdout.strip(), result.missing_layers, flush=True)
    try:
        execute_code(f"open({marker!r}, 'w').write('ran')", require_sandbox=True)
    except SandboxUnavailableError as error:
        print("refused:", error, flush=True)
""")


@needs_syscall_filter
def test_without_landlock_runs_warn_once_and_require_sandbox_refuses(tmp_path):
    marker = tmp_path / "marker.txt"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", WITHOUT_LANDLOCK, str(marker)], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first, second, refusal = done.stdout.splitlines()
    assert first == second and first.startswith("ran [")
    assert "'landlock_read', 'landlock_write'" in first
    assert done.stderr.count("code sandbox: the layers") == 1
    assert "landlock_read, landlock_write" in done.stderr
    assert refusal.startswith("refused: refusing to run model-written code: the sandbox layers")
    assert "landlock_read, landlock_write" in refusal
    # Without Landlock the program could have written the marker: it never ran.
    assert not marker.exists()


def test_require_sandbox_runs_where_every_layer_holds():
    probe = execute_code("pass")
    if probe.missing_layers:
        with pytest.raises(SandboxUnavailableError, match=probe.missing_layers[0]):
            execute_code("print('ran')", require_sandbox=True)
    else:
        assert execute_code("print('ran')", require_sandbox=True).stdout == "ran\n"


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
