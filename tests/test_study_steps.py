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


def test_a_finished_step_is_skipped_only_for_the_same_command_and_inputs(tmp_path):
    """S3: a step record ignored its arguments, so a changed command or table was reported 'already done'."""
    from volmae.studies.steps import StepChanged

    table = tmp_path / "labels_split.csv"
    table.write_text("path,split\na,train\n")
    done = tmp_path / "steps" / "step.json"
    command = [sys.executable, "-c", "pass", "--split_seed", "0"]
    first = run(command, tmp_path / "log", done, echo=False, inputs=[table])
    assert run(command, tmp_path / "log", done, echo=False, inputs=[table]) == first
    with pytest.raises(StepChanged, match=r"--split_seed 0 there, 1 here"):
        run([*command[:-1], "1"], tmp_path / "log", done, echo=False, inputs=[table])
    table.write_text("path,split\na,test\n")
    with pytest.raises(StepChanged, match=r"labels_split.csv changed"):
        run(command, tmp_path / "log", done, echo=False, inputs=[table])


def study_args(labels, out, *extra):
    from volmae.studies.volumes import get_args_parser

    return get_args_parser().parse_args(["--labels", str(labels), "--label", "malignant", "--group", "patient_id",
                                         "--output_dir", str(out), *extra])


def test_a_study_rerun_with_another_split_is_refused_before_anything_is_rewritten(tmp_path):
    """S3: `--split_seed 1` rewrote labels_split.csv, moving rows to other splits, while every step said 'already
    done'."""
    from volmae.studies.volumes import claim_study_folder, run_study
    from volmae.util.errors import UsageError

    labels = tmp_path / "labels.csv"
    labels.write_text("path,malignant,patient_id\na.nii.gz,1,p1\n")
    out = tmp_path / "study"
    out.mkdir()
    claim_study_folder(study_args(labels, out), out)
    (out / "labels_split.csv").write_text("the first study's split\n")
    for extra, change in ((["--split_seed", "1"], "split_seed 0 there, 1 here"),
                          (["--input_size", "32"], r"input_size .auto. there, \[32\] here"),
                          (["--label_case", "sensitive"], "label_case")):
        with pytest.raises(UsageError, match=change):
            run_study(study_args(labels, out, *extra))
    labels.write_text("path,malignant,patient_id\na.nii.gz,0,p1\n")
    with pytest.raises(UsageError, match="labels_sha256"):
        run_study(study_args(labels, out))
    assert (out / "labels_split.csv").read_text() == "the first study's split\n"


def test_a_test_patient_s_volume_in_the_corpus_is_never_pretrained_on(tmp_path):
    """S2: a --corpus folder holding the labelled volumes (or a copy of one under another name) put the test
    patients' scans into pretraining."""
    import pandas as pd

    from tests.conftest import shared_path
    from volmae.studies.volumes import corpus_list

    images = shared_path("lidc_nodules", "images")
    files = sorted(images.glob("*.nii.gz"))[:6]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for file in files[:4]:
        (corpus / file.name).symlink_to(file)
    (corpus / "renamed_copy.nii.gz").write_bytes(files[5].read_bytes())
    table = pd.DataFrame({"path": [str(f) for f in files], "split": ["train", "train", "val", "test", "val", "test"]})
    args = study_args(tmp_path / "labels.csv", tmp_path, "--corpus", str(corpus))
    path, counts = corpus_list(args, table, tmp_path)
    listed = {os.path.realpath(p) for p in pd.read_csv(path)["path"]}
    assert str(files[3]) not in listed and not any(p.endswith("renamed_copy.nii.gz") for p in listed)
    assert {str(f) for f in files[:3]} | {str(files[4])} <= listed
    assert counts["test volumes found in --corpus and left out"] == 2
