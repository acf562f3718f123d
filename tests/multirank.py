"""Run a trainer on several CPU ranks with torchrun, for the multi-rank tests.

A hang is not just a failure to report: torchrun starts each rank in a session of its own, so a plain
subprocess.run(timeout=...) kills torchrun and leaves the hung ranks running behind it. On a timeout this aborts
every rank, so that the fault handler (PYTHONFAULTHANDLER, set in the root conftest.py) prints where each one
was, then fails the test with those stacks.
"""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A process group of one rank for a script that uses FSDP2 or collectives without torchrun; the script's own code
# follows, with the run folder in RUN and the imports of the project's files working.
ONE_RANK = f"""
import os, socket, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, {ROOT!r})
RUN = sys.argv[1]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
dist.init_process_group("gloo", rank=0, world_size=1)
"""


def run_one_rank(code, tmp_path):
    """Run ONE_RANK + `code` (dedented) as a script whose RUN is tmp_path/run, one thread; -> its stdout, stderr."""
    script = tmp_path / "one_rank.py"
    script.write_text(ONE_RANK + textwrap.dedent(code) + "\ndist.destroy_process_group()\n")
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return out.stdout, out.stderr


def torchrun(script, args, nproc=2, timeout=300):
    """Run ROOT/script under torchrun on nproc ranks (one thread each); -> its stdout. Fails the test with the
    output's tail if it exits non-zero, and with every rank's Python stack if it outlives `timeout` seconds."""
    returncode, out, err = launch(script, args, nproc, timeout)
    assert returncode == 0, f"{script} on {nproc} ranks failed:\n{out[-3000:]}\n{err[-3000:]}"
    return out


def launch(script, args, nproc=2, timeout=300):
    """torchrun's launch, whatever its exit status: -> (exit status, stdout, stderr). A hang fails the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = abort_with_stacks(proc)
        pytest.fail(f"{script} on {nproc} ranks did not finish in {timeout} s. Every rank was aborted; their "
                    f"stacks (stderr):\n{err[-15000:]}\nstdout:\n{out[-3000:]}")
    return proc.returncode, out, err


def abort_with_stacks(proc):
    """SIGABRT to each rank, so that each prints its stack; SIGKILL whatever is left after 30 s. -> (out, err)."""
    ranks = descendants(proc.pid)
    signal_if_alive(proc.pid, signal.SIGSTOP)  # or torchrun, seeing the first rank die, kills the others unheard
    for pid in ranks:  # one at a time: they share stderr, where dumps at once would interleave
        signal_if_alive(pid, signal.SIGABRT)
        time.sleep(1)
    signal_if_alive(proc.pid, signal.SIGCONT)  # torchrun now reports the dead ranks and exits
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        for pid in [*ranks, proc.pid]:
            signal_if_alive(pid, signal.SIGKILL)
        return proc.communicate()


def descendants(pid):
    """Every process below pid, from /proc (Linux): children of children included, sessions notwithstanding."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(proc_stat(entry)[1])
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def proc_stat(pid):
    """/proc/PID/stat's fields after the process name (state, parent, ...); the name, in parentheses, may hold
    spaces."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def signal_if_alive(pid, sig):
    with contextlib.suppress(ProcessLookupError):  # it ended by itself meanwhile
        os.kill(pid, sig)
