"""Run untrusted Python (model-written code such as HumanEval answers) in a separate,
constrained process and report what happened.

`execute_code(code)` writes the program into a fresh temporary directory, starts this very
file as a script in a new Python interpreter (`sys.executable -I`), and collects stdout, stderr
and a small status report. A subprocess rather than `multiprocessing` because it behaves the same
in pytest, Ray workers and Ray Serve replicas: no fork of a multi-threaded parent, no pickling,
no dependence on how the parent was started. The child runs in its own session, so on a timeout
the parent kills its whole process group.

Before the untrusted code runs, the child shuts itself in, layer by layer:
  - its environment is empty except for a few harmless variables, and its working directory
    (also HOME and TMPDIR) is a fresh directory that the parent removes afterwards;
  - resource limits: address space and data (MemoryError is reported as memory_exceeded), CPU
    seconds, file size, no core files, and RLIMIT_NPROC=0 so that it cannot create processes
    (for other users than root this forbids threads too; Linux does not apply it to root,
    hence the system-call filter below);
  - Linux, where permitted: a new user and network namespace, so it has no network at all (not
    even loopback) and none of the host's capabilities; where that is refused, root drops all
    capabilities instead;
  - Linux with Landlock: it may write, create, remove and truncate files only inside its working
    directory, and read files and list directories only there and in what the interpreter needs:
    its prefixes (standard library, site-packages), the directories of the shared libraries it
    has loaded, a few system files that Python and the standard library open (the loader cache,
    OpenSSL's configuration, the online CPUs, locale aliases, the local time zone), /dev/null,
    /dev/urandom and its own /proc/<pid>. Everything else, such as home folders, the rest of /tmp
    and /etc, other processes' /proc entries, gives EACCES. It can execute no file at all, and
    it cannot ptrace processes outside itself;
  - Linux on x86_64 and aarch64: a seccomp filter makes the kernel refuse new processes (threads
    stay allowed), exec, signals to other processes, ptrace and process memory access, sockets,
    io_uring, and deleting, renaming or chmod-ing files;
  - in Python: os.fork, os.system, os.kill, os.remove, shutil.rmtree, subprocess.Popen, socket
    creation and similar functions are replaced by functions that raise PermissionError, and
    importing ctypes is refused. os.putenv is among them, so changing os.environ fails, and so
    does importing a library that does that at import time (numpy).
The parent enforces a wall-clock limit, keeps at most `max_output_bytes` of stdout and of stderr
(the rest is counted and dropped, so a flood neither blocks the child nor fills the parent's
memory) and never trusts the child for more than a bounded JSON status.

Each result says which kernel layers held (ExecutionResult.layers: namespaces, landlock_read,
landlock_write, seccomp, rlimits), as the child reports them before the program starts, on a
line the program cannot get ahead of. The first run in a process that misses one logs a warning;
`require_sandbox=True` refuses to run the program at all unless every layer is in force
(SandboxUnavailableError).

This is a best-effort sandbox for evaluating model-written code, not a security boundary like a
container or a virtual machine. The Python-level guards can be undone by the code they guard (for
example by re-importing ctypes); the kernel layers are much harder to escape but depend on the
host: a kernel without Landlock or user namespaces, another CPU architecture, or a container that
forbids these calls leaves only the layers that remain. Even with all of them, what stays open:
reading the interpreter's own directories (the whole virtual environment and base installation,
the system library directory) and its own /proc/<pid>; the metadata of any path (os.stat,
os.path.exists and readlink need no Landlock right, so the code can learn whether a file exists
and its size, owner and times, but not its contents or a directory's listing); CPU, memory and
time up to the limits; and as much disk inside its directory as the file-size limit allows per
file. Run untrusted code on machines whose other data you can afford to expose.
"""

import ctypes
import dataclasses
import errno
import json
import linecache
import logging
import math
import os
import platform
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback

MAX_OUTPUT_BYTES = 64 * 1024
# The child's own report (error summary, memory flag) is small; anything longer is not ours.
_STATUS_LIMIT_BYTES = 16 * 1024
_ERROR_SUMMARY_CHARS = 2000
# After the child is killed its pipes close at once; this only bounds a pathological wait.
_DRAIN_GRACE_SECONDS = 1.0
_PROGRAM_FILENAME = "<sandbox>"
# The kernel-enforced layers, as ExecutionResult.layers names them.
SANDBOX_LAYERS = ("namespaces", "landlock_read", "landlock_write", "seccomp", "rlimits")
# The child's exit status when it refuses to run the program (require_sandbox, layers missing).
_EXIT_SANDBOX_INCOMPLETE = 86

logger = logging.getLogger("nanochat")


def _no_layers() -> dict[str, bool]:
    return dict.fromkeys(SANDBOX_LAYERS, False)


def _missing(layers: dict) -> list[str]:
    return [name for name in SANDBOX_LAYERS if layers.get(name) is not True]


@dataclasses.dataclass
class ExecutionResult:
    """What happened to one program: success means it ran to the end without an exception.

    layers: which kernel layers of the sandbox were in force while the program ran (each of
    SANDBOX_LAYERS: True or False), as the child reported them before the program started; all
    False when the child died before reporting, and so before the program could start.
    """

    success: bool
    stdout: str
    stderr: str
    timed_out: bool = False
    memory_exceeded: bool = False
    error: str | None = None
    layers: dict[str, bool] = dataclasses.field(default_factory=_no_layers)

    @property
    def missing_layers(self) -> list[str]:
        """The kernel layers that were not in force, in the order of SANDBOX_LAYERS."""
        return _missing(self.layers)


class SandboxUnavailableError(RuntimeError):
    """execute_code(require_sandbox=True) on a host where not every kernel layer holds: the
    program was not run."""


def execute_code(code: str, timeout: float = 5.0, memory_limit_mb: int = 256,
                 max_output_bytes: int = MAX_OUTPUT_BYTES,
                 require_sandbox: bool = False) -> ExecutionResult:
    """Run `code` as a Python program in a sandboxed child process and return its outcome.

    timeout: wall-clock seconds for the whole run, interpreter start included.
    memory_limit_mb: address-space limit of the child.
    max_output_bytes: how much of stdout and of stderr is kept; the rest is replaced by a marker.
    require_sandbox: refuse to run the program unless every layer of SANDBOX_LAYERS is in force;
        the child then stops before the program starts and SandboxUnavailableError is raised.
        Without it the program runs under the layers this host allows, the first run that
        misses one logs a warning on the "nanochat" logger, and the result's `layers` says
        which held.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str of Python source, got {type(code).__name__}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
    if memory_limit_mb < 32:
        raise ValueError(f"memory_limit_mb={memory_limit_mb} is too small for a Python interpreter; "
                         "use at least 32")
    sandbox_root = tempfile.mkdtemp(prefix="nanochat_sandbox_")
    try:
        result, layers_reported = _run_child(code, sandbox_root, timeout, memory_limit_mb,
                                             max_output_bytes, require_sandbox)
    finally:
        _remove_tree(sandbox_root)
    # A child that did not report its layers died before the program started (a timeout during
    # start-up, say): its result is a failure like any other.
    missing = result.missing_layers if layers_reported else []
    if require_sandbox and missing:
        raise SandboxUnavailableError(
            "refusing to run model-written code: the sandbox layers "
            f"{', '.join(missing)} are not in force on this host ({_host()}). Run it on a Linux "
            "host that allows Landlock, seccomp and user namespaces, or leave out require_sandbox "
            "(--require-sandbox) to accept the layers that remain.")
    if missing:
        _log_missing_layers_once(missing)
    return result


_missing_layers_logged = False
_missing_layers_log_lock = threading.Lock()


def _log_missing_layers_once(missing) -> None:
    global _missing_layers_logged
    with _missing_layers_log_lock:
        if _missing_layers_logged:
            return
        _missing_layers_logged = True
    logger.warning(f"code sandbox: the layers {', '.join(missing)} are not in force on this host "
                   f"({_host()}); model-written code runs under the remaining ones "
                   "(require_sandbox / --require-sandbox refuses to run it instead). "
                   "Logged once per process.")


def _host() -> str:
    return f"{platform.system()} {platform.release()}, {platform.machine()}"


# ---------------------------------------------------------------------------------------------
# Parent side


def _run_child(code, sandbox_root, timeout, memory_limit_mb, max_output_bytes, require_sandbox):
    """Run the child; return its ExecutionResult and whether it reported its layers."""
    program_path = os.path.join(sandbox_root, "program.py")
    with open(program_path, "w", encoding="utf-8") as program_file:
        program_file.write(code)
    workdir = os.path.join(sandbox_root, "work")
    os.mkdir(workdir)
    # Only what the child needs: a home and temp dir inside the sandbox, and one thread per
    # numeric library, since the child may not create many threads. No PATH: it may not exec.
    child_env = {"HOME": workdir, "TMPDIR": workdir, "OMP_NUM_THREADS": "1",
                 "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    status_read, status_write = os.pipe()
    # -I: ignore PYTHON* variables and the user site; -B: never write .pyc files from the
    # sandbox; -u: unbuffered, so output printed before a timeout still reaches us.
    command = [sys.executable, "-I", "-B", "-u", "-X", "utf8", os.path.abspath(__file__),
               program_path, str(status_write), repr(float(timeout)), str(int(memory_limit_mb)),
               "require" if require_sandbox else "accept"]
    deadline = time.monotonic() + timeout
    try:
        child = subprocess.Popen(command, cwd=workdir, env=child_env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 pass_fds=(status_write,), start_new_session=True)
    except BaseException:
        os.close(status_read)
        raise
    finally:
        os.close(status_write)

    stdout, stderr = _CappedBuffer(max_output_bytes), _CappedBuffer(max_output_bytes)
    status = _CappedBuffer(_STATUS_LIMIT_BYTES)
    outputs = {child.stdout.fileno(): stdout, child.stderr.fileno(): stderr, status_read: status}
    try:
        with selectors.DefaultSelector() as selector:
            for fd in outputs:
                selector.register(fd, selectors.EVENT_READ)
            finished = _collect_until_exit(child, selector, outputs, deadline)
            # The group is killed even after a normal exit: it takes along anything the program
            # managed to start. The leader is not reaped yet, so its group id cannot be reused.
            _kill_process_group(child.pid)
            _drain(selector, outputs, time.monotonic() + _DRAIN_GRACE_SECONDS)
    finally:
        _kill_process_group(child.pid)  # again, for when we got here by an exception
        returncode = child.wait()
        child.stdout.close()
        child.stderr.close()
        os.close(status_read)

    # The first line is the bootstrap's report of its layers, written before the program
    # started; what follows is the report on the program (which the program could forge).
    layers_line, _, status_line = status.data().partition(b"\n")
    reported = _parse_status(layers_line)
    layers = _no_layers()
    if reported is not None and isinstance(reported.get("layers"), dict):
        layers.update({name: reported["layers"].get(name) is True for name in SANDBOX_LAYERS})
    result = _interpret(finished, returncode, stdout.text(), stderr.text(),
                        _parse_status(status_line), timeout)
    result.layers = layers
    return result, reported is not None


def _interpret(finished, returncode, stdout, stderr, status, timeout) -> ExecutionResult:
    if not finished:
        return ExecutionResult(success=False, stdout=stdout, stderr=stderr, timed_out=True,
                               error=f"timed out after {timeout:g} s (wall clock)")
    if returncode < 0:
        if -returncode == signal.SIGXCPU:
            return ExecutionResult(success=False, stdout=stdout, stderr=stderr, timed_out=True,
                                   error="CPU time limit exceeded")
        return ExecutionResult(success=False, stdout=stdout, stderr=stderr,
                               error=f"killed by signal {_signal_name(-returncode)}")
    if status is None:
        # The program ended without the bootstrap's report (os._exit, a closed status pipe).
        error = None if returncode == 0 else f"exited with status {returncode}"
        return ExecutionResult(success=returncode == 0, stdout=stdout, stderr=stderr, error=error)
    error = status.get("error")
    return ExecutionResult(success=returncode == 0 and error is None, stdout=stdout, stderr=stderr,
                           memory_exceeded=bool(status.get("memory_exceeded")),
                           error=None if error is None else str(error))


class _CappedBuffer:
    """Keeps the first `limit` bytes of a stream and counts the rest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.kept)
        self.kept += chunk[:max(room, 0)]
        self.dropped += max(len(chunk) - room, 0)

    def data(self) -> bytes:
        return bytes(self.kept)

    def text(self) -> str:
        text = self.kept.decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\n[output truncated: {self.dropped} more bytes not shown]\n"
        return text


def _read_ready(selector, outputs, timeout) -> None:
    """Read whatever is ready within `timeout` seconds; unregister streams that reached EOF."""
    for key, _ in selector.select(timeout=max(timeout, 0.0)):
        chunk = os.read(key.fd, 65536)
        if chunk:
            outputs[key.fd].add(chunk)
        else:
            selector.unregister(key.fd)


def _collect_until_exit(child, selector, outputs, deadline) -> bool:
    """Read the child's output until it has exited and closed its pipes. False on timeout."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if selector.get_map():
            _read_ready(selector, outputs, min(remaining, 0.05))
        elif _has_exited(child):
            return True
        else:
            time.sleep(min(remaining, 0.005))


def _drain(selector, outputs, deadline) -> None:
    while selector.get_map() and time.monotonic() < deadline:
        _read_ready(selector, outputs, deadline - time.monotonic())


def _has_exited(child) -> bool:
    """True once the child has exited, without reaping it (so its process group id stays ours)."""
    if not hasattr(os, "waitid"):  # macOS: reaping early is the only option
        return child.poll() is not None
    try:
        return os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped by someone else (SIGCHLD ignored)
        return True


def _kill_process_group(pid) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_name(number) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _parse_status(raw: bytes) -> dict | None:
    try:
        status = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def _remove_tree(path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.exists(path):
        return
    # The program may have created directories without write permission (os.mkdir's mode is
    # allowed). Make them writable again; never follow links, which may point anywhere.
    os.chmod(path, 0o700)
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            directory = os.path.join(root, name)
            if not os.path.islink(directory):
                os.chmod(directory, 0o700)
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Child side: everything below runs in the sandboxed interpreter, before and around the program.


def _sandbox_main(program_path, status_fd, timeout, memory_limit_mb, require_sandbox) -> None:
    with open(program_path, encoding="utf-8") as program_file:
        source = program_file.read()
    layers = _isolate_from_host(os.getcwd(), timeout, memory_limit_mb)
    # Keep what reporting needs before the program can replace it.
    write, exit_now = os.write, os._exit
    _disable_dangerous_python_functions()
    # One short line (below PIPE_BUF, so written whole) that the program cannot get ahead of.
    write(status_fd, (json.dumps({"layers": layers}) + "\n").encode("utf-8"))
    if require_sandbox and _missing(layers):
        exit_now(_EXIT_SANDBOX_INCOMPLETE)
    status = _run_program(source, write)
    try:
        write(status_fd, json.dumps(status).encode("utf-8"))
    except OSError:
        pass  # the program closed our status pipe; the parent falls back to the exit status
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    # os._exit: atexit handlers and finalizers the program registered do not run.
    exit_now(0 if status["error"] is None else 1)


def _run_program(source, write) -> dict:
    """Execute the untrusted source; return {'error': summary or None, 'memory_exceeded': bool}."""
    linecache.cache[_PROGRAM_FILENAME] = (len(source), None, source.splitlines(True),
                                          _PROGRAM_FILENAME)
    program_globals = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, _PROGRAM_FILENAME, "exec"), program_globals)
    except SystemExit as exit_request:
        if exit_request.code in (None, 0):
            return {"error": None, "memory_exceeded": False}
        return {"error": f"SystemExit: {exit_request.code}"[:_ERROR_SUMMARY_CHARS],
                "memory_exceeded": False}
    except BaseException as failure:
        memory_exceeded = isinstance(failure, MemoryError)
        # Skip our own frame: the traceback starts in the program.
        trace = failure.__traceback__.tb_next if failure.__traceback__ else None
        # Free what the program built (its globals, its functions' locals) before formatting
        # the traceback, which needs memory of its own.
        program_globals.clear()
        traceback.clear_frames(trace)
        try:
            report = "".join(traceback.format_exception(type(failure), failure, trace))
            summary = traceback.format_exception_only(type(failure), failure)[-1].strip()
        except MemoryError:
            report = summary = type(failure).__name__
        try:
            write(2, report.encode("utf-8", errors="replace"))
        except OSError:
            pass
        return {"error": summary[:_ERROR_SUMMARY_CHARS], "memory_exceeded": memory_exceeded}
    return {"error": None, "memory_exceeded": False}


def _isolate_from_host(workdir, timeout, memory_limit_mb) -> dict[str, bool]:
    """Kernel-level confinement; the order matters (see each step). Returns which of
    SANDBOX_LAYERS are in force."""
    layers = _no_layers()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        # First: unshare needs a single-threaded process with its capabilities intact.
        layers["namespaces"] = _enter_private_namespaces(libc)
        if not layers["namespaces"]:
            _drop_capabilities(libc)
        # Both Landlock and seccomp require no_new_privs when the process lacks CAP_SYS_ADMIN.
        libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                   ctypes.c_ulong(0))
        # After every file the bootstrap reads itself (the program, this module's imports).
        landlock = _confine_file_access(libc, workdir)
        layers["landlock_read"] = layers["landlock_write"] = landlock
    layers["rlimits"] = _apply_resource_limits(timeout, memory_limit_mb)
    if sys.platform.startswith("linux"):
        # Last: after this the kernel refuses the calls the steps above needed.
        layers["seccomp"] = _install_syscall_filter(libc)
    return layers


_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def _enter_private_namespaces(libc) -> bool:
    """A new network namespace (no interfaces up, so no network at all), inside a new user
    namespace when allowed, which also leaves the host's capabilities behind. True when both
    were created."""
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        return True
    libc.unshare(_CLONE_NEWNET)  # root without user namespaces; refused elsewhere, which is fine
    return False


class _CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapabilityData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _drop_capabilities(libc) -> None:
    """Give up every capability (matters for root: no mount, no reboot, no overriding file
    permissions). The uid stays, so the program still reads the interpreter's files."""
    header = _CapabilityHeader(version=0x20080522, pid=0)  # _LINUX_CAPABILITY_VERSION_3
    no_capabilities = (_CapabilityData * 2)()
    libc.capset(ctypes.byref(header), no_capabilities)


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _LandlockPathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


# The Landlock system calls have the same numbers on every architecture.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
# Access rights from linux/landlock.h. ABI 1: execute, write and read a file, list a directory
# (bits 0 to 3), remove a directory or file (4, 5), make a char device, directory, regular file,
# socket, fifo, block device or symlink (6 to 12). ABI 2: move or link files between directories
# (13). ABI 3: truncate (14).
_LANDLOCK_EXECUTE, _LANDLOCK_WRITE_FILE, _LANDLOCK_READ_FILE, _LANDLOCK_READ_DIR = 1, 2, 4, 8
_LANDLOCK_CHANGE_TREE_ABI1 = sum(1 << bit for bit in range(4, 13))
_LANDLOCK_REFER, _LANDLOCK_TRUNCATE = 1 << 13, 1 << 14
_LANDLOCK_READ = _LANDLOCK_READ_FILE | _LANDLOCK_READ_DIR
# The rights that a rule on a file (not a directory) may carry.
_LANDLOCK_FILE_RIGHTS = _LANDLOCK_EXECUTE | _LANDLOCK_WRITE_FILE | _LANDLOCK_READ_FILE | (
    _LANDLOCK_TRUNCATE)
# Files outside the interpreter's directories that Python or the standard library open after the
# sandbox is in place, found by tracing the child's openat calls (strace -f) on Debian 12 while
# it imported and used the standard library: the dynamic loader's cache (every extension module
# that loads a library), OpenSSL's configuration (hashlib), the online CPUs (os.cpu_count), and
# what start-up reads and locale.setlocale or time.tzset read again (locale aliases, the local
# time zone). None is essential (without them Python falls back: default OpenSSL settings, UTC,
# another count of the CPUs), but with them the stdlib behaves as it does outside. Missing
# ones are skipped, so other distributions simply get fewer rules.
_SYSTEM_FILES_READ = ("/etc/ld.so.cache", "/usr/lib/ssl/openssl.cnf",
                      "/sys/devices/system/cpu/online", "/usr/share/locale/locale.alias",
                      "/etc/localtime")
_DEVICES_READ = ("/dev/urandom",)
_DEVICES_READ_WRITE = ("/dev/null",)


def _confine_file_access(libc, workdir) -> bool:
    """Landlock: read, write, create, remove and truncate files beneath `workdir`; read (never
    write or execute) only what the interpreter needs (see _readable_paths); execute nothing.
    Everything else fails with EACCES. Being in a Landlock domain also stops ptrace-style access
    (including /proc/<pid>/environ and /proc/<pid>/mem) to processes outside it. True when the
    rules are in force."""
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                  ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 1:
        return False
    change_tree = _LANDLOCK_CHANGE_TREE_ABI1 | (_LANDLOCK_REFER if abi >= 2 else 0)
    truncate = _LANDLOCK_TRUNCATE if abi >= 3 else 0
    handled = _LANDLOCK_EXECUTE | _LANDLOCK_WRITE_FILE | _LANDLOCK_READ | change_tree | truncate
    ruleset = _LandlockRulesetAttr(handled_access_fs=handled)
    ruleset_fd = syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(ruleset),
                         ctypes.c_size_t(ctypes.sizeof(ruleset)), ctypes.c_uint32(0))
    if ruleset_fd < 0:
        return False
    read_write = _LANDLOCK_READ | _LANDLOCK_WRITE_FILE | truncate
    rules = [(workdir, read_write | change_tree)]
    rules += [(path, _LANDLOCK_READ) for path in _readable_paths()]
    rules += [(path, _LANDLOCK_READ_FILE | _LANDLOCK_WRITE_FILE) for path in _DEVICES_READ_WRITE]
    try:
        for path, access in rules:
            # A rule that cannot be added only takes an allowance away: the sandbox stays closed.
            _add_landlock_rule(syscall, ruleset_fd, path, access)
        return syscall(ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset_fd),
                       ctypes.c_uint32(0)) == 0
    finally:
        os.close(ruleset_fd)


def _readable_paths() -> list[str]:
    """What the interpreter reads once the program runs: its prefixes (standard library,
    site-packages), the directories of every file it has mapped (its shared libraries, found in
    /proc/self/maps, and so the libraries that extension modules load later, which lie beside
    them), a few system files, /dev/urandom and its own /proc/<pid> (/proc/self is a link to it).
    The workdir's own rule covers the program's files."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            # Mapped files have an absolute path; pseudo-mappings are [heap], [stack] and the like.
            if len(fields) == 6 and fields[5].startswith("/"):
                mapped = fields[5].rstrip("\n")
                if os.path.isfile(mapped):
                    paths.add(os.path.dirname(mapped))
    paths.update(_SYSTEM_FILES_READ)
    paths.update(_DEVICES_READ)
    paths.add(f"/proc/{os.getpid()}")
    return sorted(paths)


def _add_landlock_rule(syscall, ruleset_fd, path, access) -> None:
    """Allow `access` beneath `path` (a directory) or on `path` itself (a file); the path's
    links are followed, so the rule is on what it resolves to."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _LANDLOCK_FILE_RIGHTS
        rule = _LandlockPathBeneathAttr(allowed_access=access, parent_fd=fd)
        syscall(ctypes.c_long(_SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset_fd),
                ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0))
    finally:
        os.close(fd)


def _apply_resource_limits(timeout, memory_limit_mb) -> bool:
    """Soft and hard limits are set together, so the program cannot raise them again. True when
    every limit is in place."""
    memory_bytes = memory_limit_mb * 1024 * 1024
    cpu_seconds = math.ceil(timeout)
    limits = [(resource.RLIMIT_AS, memory_bytes, memory_bytes),
              (resource.RLIMIT_DATA, memory_bytes, memory_bytes),
              # SIGXCPU at the soft limit, SIGKILL one second later if that is caught.
              (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
              (resource.RLIMIT_FSIZE, memory_bytes, memory_bytes),
              (resource.RLIMIT_CORE, 0, 0)]
    if hasattr(resource, "RLIMIT_NPROC"):
        limits.append((resource.RLIMIT_NPROC, 0, 0))
    applied = hasattr(resource, "RLIMIT_NPROC")
    for which, soft, hard in limits:
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            applied = False  # e.g. macOS refuses some address-space limits; the rest remain
    return applied


# Syscall numbers of the calls the filter refuses, per architecture (from the kernel's unistd
# headers). aarch64 has no fork, vfork, unlink, rmdir, rename or chmod: only the *at forms.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALL_NUMBERS = {
    "x86_64": {"fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "ptrace": 101,
               "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_send_signal": 424,
               "pidfd_getfd": 438, "socket": 41, "socketpair": 53, "io_uring_setup": 425,
               "unlink": 87, "unlinkat": 263, "rmdir": 84, "rename": 82, "renameat": 264,
               "renameat2": 316, "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452,
               "clone": 56, "clone3": 435, "kill": 62, "tkill": 200, "tgkill": 234},
    "aarch64": {"execve": 221, "execveat": 281, "ptrace": 117, "process_vm_readv": 270,
                "process_vm_writev": 271, "pidfd_send_signal": 424, "pidfd_getfd": 438,
                "socket": 198, "socketpair": 199, "io_uring_setup": 425, "unlinkat": 35,
                "renameat": 38, "renameat2": 276, "fchmod": 52, "fchmodat": 53, "fchmodat2": 452,
                "clone": 220, "clone3": 435, "kill": 129, "tkill": 130, "tgkill": 131},
}
_ALWAYS_REFUSED = ("fork", "vfork", "execve", "execveat", "ptrace", "process_vm_readv",
                   "process_vm_writev", "pidfd_send_signal", "pidfd_getfd", "socket", "socketpair",
                   "io_uring_setup", "unlink", "unlinkat", "rmdir", "rename", "renameat",
                   "renameat2", "chmod", "fchmod", "fchmodat", "fchmodat2")
_SIGNAL_SYSCALLS = ("kill", "tkill", "tgkill")
_X32_SYSCALL_BIT = 0x40000000
_CLONE_THREAD = 0x00010000
# Classic BPF opcodes and offsets into struct seccomp_data (nr, arch, ip, args[6]).
_BPF_LOAD_WORD, _BPF_JUMP_EQUAL, _BPF_JUMP_GREATER_EQUAL, _BPF_JUMP_BITS_SET, _BPF_RETURN = (
    0x20, 0x15, 0x35, 0x45, 0x06)
_DATA_NR, _DATA_ARCH, _DATA_ARG0_LOW = 0, 4, 16  # little-endian: low word of args[0] first
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _syscall_filter_program(machine: str, own_pid: int) -> list[tuple[int, int, int, int]]:
    """The seccomp program as (code, jump_if_true, jump_if_false, constant) instructions."""
    numbers = _SYSCALL_NUMBERS[machine]
    refuse = _SECCOMP_RET_ERRNO | errno.EPERM
    allow = _SECCOMP_RET_ALLOW
    program = [(_BPF_LOAD_WORD, 0, 0, _DATA_ARCH),
               (_BPF_JUMP_EQUAL, 1, 0, _AUDIT_ARCH[machine]),
               (_BPF_RETURN, 0, 0, refuse),  # a foreign ABI (32-bit calls on x86_64)
               (_BPF_LOAD_WORD, 0, 0, _DATA_NR)]
    if machine == "x86_64":  # x32 calls carry their own numbering: refuse them all
        program += [(_BPF_JUMP_GREATER_EQUAL, 0, 1, _X32_SYSCALL_BIT), (_BPF_RETURN, 0, 0, refuse)]
    for name in _ALWAYS_REFUSED:
        if name in numbers:
            program += [(_BPF_JUMP_EQUAL, 0, 1, numbers[name]), (_BPF_RETURN, 0, 0, refuse)]
    # clone3 hides its flags behind a pointer the filter cannot read; ENOSYS makes the C library
    # fall back to clone, whose flags it can read.
    program += [(_BPF_JUMP_EQUAL, 0, 1, numbers["clone3"]),
                (_BPF_RETURN, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS)]

    def allow_when_first_argument(syscall_number, jump_code, value):
        # Not this call: skip the 4 instructions. Otherwise test args[0] and return.
        return [(_BPF_JUMP_EQUAL, 0, 4, syscall_number), (_BPF_LOAD_WORD, 0, 0, _DATA_ARG0_LOW),
                (jump_code, 1, 0, value), (_BPF_RETURN, 0, 0, refuse), (_BPF_RETURN, 0, 0, allow)]

    program += allow_when_first_argument(numbers["clone"], _BPF_JUMP_BITS_SET, _CLONE_THREAD)
    for name in _SIGNAL_SYSCALLS:  # signals only to itself (abort, raise_signal)
        program += allow_when_first_argument(numbers[name], _BPF_JUMP_EQUAL, own_pid)
    program.append((_BPF_RETURN, 0, 0, allow))
    return program


def _install_syscall_filter(libc) -> bool:
    """True when the filter is in force."""
    machine = platform.machine()
    if machine not in _SYSCALL_NUMBERS:
        return False
    instructions = _syscall_filter_program(machine, os.getpid())
    filters = (_SockFilter * len(instructions))(*[_SockFilter(*inst) for inst in instructions])
    fprog = _SockFprog(len(instructions), filters)
    return libc.prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


def _refused(qualified_name):
    def refused_function(*args, **kwargs):
        raise PermissionError(f"{qualified_name}() is disabled in the nanochat sandbox")
    refused_function.__name__ = qualified_name.rsplit(".", 1)[-1]
    return refused_function


_DANGEROUS_FUNCTIONS = {
    "os": ("kill", "killpg", "system", "popen", "fork", "forkpty", "spawnl", "spawnle", "spawnlp",
           "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "execl", "execle", "execlp",
           "execlpe", "execv", "execve", "execvp", "execvpe", "posix_spawn", "posix_spawnp",
           "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
           "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chflags",
           "lchflags", "putenv", "unsetenv", "setuid", "seteuid", "setreuid", "setresuid",
           "setgid", "setegid", "setregid", "setresgid", "setsid", "setpgid", "setpgrp",
           "pidfd_open", "plock"),
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen", "call", "run", "check_call", "check_output", "getoutput",
                   "getstatusoutput"),
    "_posixsubprocess": ("fork_exec",),
    "signal": ("pidfd_send_signal", "pthread_kill"),
    "socket": ("socketpair", "create_connection", "create_server", "fromfd"),
    "_socket": ("socketpair",),
}
_BLOCKED_MODULES = ("ctypes", "_ctypes", "ctypes.util")


def _disable_dangerous_python_functions() -> None:
    """Replace destructive or escaping functions with ones that raise PermissionError."""
    import _posixsubprocess
    import _socket
    import posix
    import socket

    modules = {"os": os, "shutil": shutil, "subprocess": subprocess, "signal": signal,
               "_posixsubprocess": _posixsubprocess, "socket": socket, "_socket": _socket}
    for module_name, function_names in _DANGEROUS_FUNCTIONS.items():
        for function_name in function_names:
            # os re-exports posix: the same functions are reachable under both names.
            for module in (modules[module_name], posix) if module_name == "os" else (
                    modules[module_name],):
                if hasattr(module, function_name):
                    setattr(module, function_name, _refused(f"{module_name}.{function_name}"))

    # Sockets are classes, and the standard library subclasses them at import time (ssl), so
    # they are replaced by subclasses whose construction fails rather than by functions.
    class RefusedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("socket.socket() is disabled in the nanochat sandbox")

    class RefusedRawSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("_socket.socket() is disabled in the nanochat sandbox")

    socket.socket = socket.SocketType = RefusedSocket
    _socket.socket = _socket.SocketType = RefusedRawSocket
    for module_name in _BLOCKED_MODULES:
        sys.modules[module_name] = None  # `import ctypes` now raises ImportError


if __name__ == "__main__":
    _sandbox_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]),
                  sys.argv[5] == "require")
