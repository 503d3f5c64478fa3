"""Process-wide settings: torch's thread count following the machine's load (crosslib.runtime.follow_load)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from crosslib import progress as progress_module
from crosslib import runtime
from crosslib.config import ParameterError
from crosslib.progress import progress
from crosslib.runtime import THREADS_ENV, LoadFollower, configure_process, follow_load

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc accounting")


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_one_thread_per_core_that_other_processes_leave_free():
    follower = LoadFollower(max_threads=2, cores=[0, 1])
    assert [follower.threads_for(others) for others in (0.0, 0.3, 0.49)] == [2, 2, 2]
    assert [follower.threads_for(others) for others in (0.51, 0.67, 1.0, 1.4, 2.0, 5.0)] == [1] * 6  # never 0
    four = LoadFollower(max_threads=4, cores=[0, 1, 2, 3])
    assert [four.threads_for(others) for others in (0.2, 0.7, 1.6, 3.0)] == [4, 3, 2, 1]
    assert LoadFollower(max_threads=8, cores=[0, 1]).max_threads == 2  # no more threads than cores


def test_other_processes_time_is_the_machines_busy_time_less_our_own():
    follower = LoadFollower(max_threads=2, cores=[0, 1])
    per_second = follower.ticks_per_second
    # over 2 s the two cores were busy 3 s (in ticks), of which we used 1.8 s: others held 0.6 of a core
    before, after = (10.0, 1000, 400), (12.0, 1000 + 3 * per_second, 400 + int(1.8 * per_second))
    assert follower.others(before, after) == pytest.approx(0.6)
    assert follower.others(before, (12.0, 1000, 400 + per_second)) == 0.0  # accounting skew: never negative


def test_a_busy_process_is_seen_and_the_first_look_only_takes_a_sample():
    follower = LoadFollower(max_threads=2, interval=0.5)
    assert follower.poll() is None  # nothing to compare with yet
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        start = follower.sample()
        time.sleep(1.0)
        assert follower.others(start, follower.sample()) > 0.5  # it held (most of) a core
    finally:
        spinner.kill()
        spinner.wait()


def test_follow_load_sets_torch_threads_only_when_an_entry_point_asked(monkeypatch, threads_restored):
    class Decided:
        def poll(self):
            return 1

    monkeypatch.setattr(runtime, "_FOLLOWER", [Decided()])
    torch.set_num_threads(2)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    follow_load()  # library use: torch left alone
    assert torch.get_num_threads() == 2
    monkeypatch.setenv(THREADS_ENV, "fixed")
    follow_load()
    assert torch.get_num_threads() == 2
    monkeypatch.setenv(THREADS_ENV, "follow")
    follow_load()
    assert torch.get_num_threads() == 1


def test_every_progress_bar_step_lets_the_threads_follow(monkeypatch):
    calls = []
    monkeypatch.setattr(progress_module, "follow_load", lambda: calls.append(1))
    assert list(progress(range(5), disable=True)) == list(range(5))  # silent bars too (progress=False)
    assert len(calls) == 5
    bar = progress(total=3)
    bar.update(2)
    bar.close()
    assert len(calls) == 6


def test_configure_process_turns_following_on_for_itself_and_its_children(monkeypatch):
    for name in (THREADS_ENV, *runtime.MALLOC_ENV):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    configure_process()
    child = subprocess.run([sys.executable, "-c", f"import os; print(os.environ['{THREADS_ENV}'])"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "follow"
    monkeypatch.setenv(THREADS_ENV, "fixed")
    configure_process()  # a user's choice stays
    assert os.environ[THREADS_ENV] == "fixed"
    monkeypatch.setenv(THREADS_ENV, "4")
    with pytest.raises(ParameterError, match=f"{THREADS_ENV}='4' is not allowed: use one of follow, fixed"):
        configure_process()
