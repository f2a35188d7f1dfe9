"""A study's step costs what all its attempts cost: a failed or killed attempt's CPU time is kept beside the
step's record and added when the step finally finishes (the LIDC study's resumed pretrainings were costed at
their last part alone)."""
import json
import os
import sys

import pytest

from volmae.studies import steps
from volmae.studies.steps import StepFailed, cpu_so_far, run

BURN = """
import sys, time
start = time.process_time()
while time.process_time() - start < 0.5:
    pass
sys.exit(int(sys.argv[1]))
"""


def test_a_failed_attempt_s_cpu_is_added_to_the_finished_step_s(tmp_path):
    done = tmp_path / "steps" / "burn.json"
    with pytest.raises(StepFailed, match="exited with 3"):
        run([sys.executable, "-c", BURN, "3"], tmp_path / "first.log", done, echo=False)
    first = json.loads((tmp_path / "steps" / "burn.partial.json").read_text())["cpu_seconds"]
    assert first >= 0.4 and not done.exists()
    record = run([sys.executable, "-c", BURN, "0"], tmp_path / "second.log", done, echo=False)
    assert record["cpu_seconds"] >= first + 0.4 and json.loads(done.read_text()) == record
    assert not (tmp_path / "steps" / "burn.partial.json").exists()


WAITS_FOR_ITS_SAMPLE = """
import json, pathlib, sys, time
start = time.process_time()
while time.process_time() - start < 0.5:
    pass
print("burnt", flush=True)
partial = pathlib.Path(sys.argv[1])
deadline = time.monotonic() + 120
while not partial.exists() and time.monotonic() < deadline:
    print("waiting", flush=True)
    time.sleep(0.05)
sys.exit(0 if json.loads(partial.read_text())["cpu_seconds"] >= 0.4 else 4)
"""


def test_a_running_step_s_cpu_is_saved_while_it_runs_so_a_killed_one_still_counts(tmp_path, monkeypatch):
    """The step itself waits until its own CPU so far appears beside its record, as it would be left if the
    study were killed now."""
    monkeypatch.setattr(steps, "CPU_SAMPLE_SECONDS", 0.0)
    done = tmp_path / "steps" / "sampled.json"
    partial = tmp_path / "steps" / "sampled.partial.json"
    record = run([sys.executable, "-c", WAITS_FOR_ITS_SAMPLE, str(partial)], tmp_path / "log", done, echo=False)
    assert record["cpu_seconds"] >= 0.4 and not partial.exists()


def test_cpu_so_far_reads_a_live_process_s_own_time():
    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        pytest.skip("no /proc here (Linux only): a killed step's CPU is then not sampled")
    own = os.times()
    assert cpu_so_far(os.getpid()) == pytest.approx(own.user + own.system + own.children_user + own.children_system,
                                                    abs=0.1)
