"""The run-directory lock: held by a live process it refuses naming the holder; a dead holder's lock is taken over."""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tokenlab.utils.runlock import LOCK_FILE, RunDirLocked, lock_holder, run_dir_lock

HOLD = textwrap.dedent(
    """
    import sys, time
    from tokenlab.utils.runlock import run_dir_lock
    with run_dir_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


@pytest.mark.slow
def test_a_live_holder_is_named_and_its_death_frees_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=rf"in use by pid {holder.pid} on host {socket.gethostname()} since "):
            with run_dir_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up, the record stays behind
        holder.wait()
    assert lock_holder(tmp_path)["pid"] == holder.pid
    with run_dir_lock(tmp_path):  # the kernel dropped the dead holder's flock
        assert lock_holder(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_stale_record_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "since": time.time() - 60}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING), run_dir_lock(tmp_path):
        assert lock_holder(tmp_path)["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {record['pid']}" in caplog.text


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with run_dir_lock(tmp_path):
        with run_dir_lock(tmp_path / "." / ""):
            pass
        assert (tmp_path / LOCK_FILE).exists()  # still held by the outer block
    assert not (tmp_path / LOCK_FILE).exists()
