"""tests/multirank.py, the torchrun launcher of the multi-rank tests: a hung launch fails with every rank's stack
and leaves no rank running."""
import textwrap

import pytest

from multirank import proc_stat, torchrun

HANG = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist

    dist.init_process_group("gloo")
    with open(os.path.join(sys.argv[1], f"pid{dist.get_rank()}"), "w") as f:
        f.write(str(os.getpid()))
    if dist.get_rank() == 0:
        dist.barrier()  # waits for rank 1, which never comes
    else:
        time.sleep(600)
""")


def running(pid):
    """Alive and not a zombie (an orphan's exit may wait for a reaper that a container lacks)."""
    try:
        return proc_stat(pid)[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_hung_launch_fails_with_each_ranks_stack_and_leaves_no_rank_running(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    with pytest.raises(pytest.fail.Exception) as failure:
        torchrun(str(script), [tmp_path], timeout=30)
    message = str(failure.value)
    assert "did not finish in 30 s" in message
    assert "in barrier" in message  # rank 0, inside torch.distributed
    assert 'hang.py", line 9' in message and 'hang.py", line 11' in message  # each rank's own line
    pids = [int((tmp_path / f"pid{rank}").read_text()) for rank in (0, 1)]
    assert not any(running(pid) for pid in pids)
