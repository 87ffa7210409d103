"""How long a test waits for a subprocess before calling it hung.

One limit for every subprocess a test starts: far above any honest run on a busy 2-core machine,
so a test fails for a hang, never for being slow. A test that waits says for what in its message:
the helpers below take that `what` ("training worker (2 gloo ranks under torchrun)") and put it,
the command and the tail of its output in the failure."""
import subprocess
import time
from pathlib import Path

HANG_S = 30 * 60
TAIL = 4000   # characters of a hung process's stdout and stderr in the failure


def _tail(text) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-TAIL:]


def hung(what: str, cmd, out=None, err=None) -> AssertionError:
    """The failure of a wait that reached HANG_S: what was waited for, the command, its output's tail."""
    cmd = " ".join(map(str, cmd)) if isinstance(cmd, (list, tuple)) else str(cmd)
    return AssertionError(f"{what} still running after {HANG_S} s: a hang\n$ {cmd}\n"
                          f"--- stdout (tail)\n{_tail(out)}\n--- stderr (tail)\n{_tail(err)}")


def run_until_hang(cmd, what: str, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, **kwargs) allowed HANG_S; past it an AssertionError that names `what`."""
    try:
        return subprocess.run(cmd, timeout=HANG_S, **kwargs)
    except subprocess.TimeoutExpired as e:   # run() has killed the process and collected its output
        raise hung(what, cmd, e.stdout, e.stderr) from None


def communicate_until_hang(proc: subprocess.Popen, what: str, log=None) -> tuple:
    """proc.communicate() allowed HANG_S: (stdout, stderr). Past it the process is killed and an
    AssertionError names `what`, with the tail of its pipes or of `log` (a file it writes to)."""
    try:
        return proc.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired as e:   # e holds what the pipes gave so far
        proc.kill()
        proc.wait()   # not communicate(): a child of the process may hold its pipes open
        out = Path(log).read_text(errors="replace") if log is not None else e.stdout
        raise hung(what, proc.args, out, e.stderr) from None


def wait_until(done, what: str, every: float = 0.1) -> None:
    """Poll done() until it is true; an AssertionError if `what` (the event awaited) has not
    happened after HANG_S."""
    deadline = time.monotonic() + HANG_S
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {HANG_S} s for {what}: a hang")
        time.sleep(every)
