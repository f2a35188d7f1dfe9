"""Scale out and survive: DeepSpeed ZeRO, multi-node rendezvous, preemption, crash recovery, SLURM."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, shared_path
from tests.slurm_cluster import local_slurm
from volmae.inference.checkpoints import load_checkpoint
from volmae.util.atomic import TEMPORARY_GLOB
from volmae.util.dist import rank_environment
from volmae.util.preemption import EXIT_PREEMPTED
from volmae.util.run_log import read_log

TINY = ["--model", "mae_vit_tiny_patch16", "--input_size", "28", "--patch_size", "14", "--decoder_embed_dim", "64",
        "--decoder_depth", "1", "--decoder_num_heads", "2", "--num_workers", "0", "--log_every", "1",
        "--vis_every", "0", "--warmup_epochs", "1", "--lr", "1e-3", "--keep_every", "0",
        "--precision", "fp32"]  # runs are compared step by step: bf16 (auto on CPUs with it) rounds with the batch split


def pretrain_command(data: Path, out: Path, *extra: str) -> list[str]:
    return ["main_pretrain.py", "--data_path", str(data), *TINY, "--output_dir", str(out), *extra]


def torchrun(port: int, *args: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *args]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out / "log.txt")}


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_step(out: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "log.txt").exists() and max(losses(out), default=0) >= step:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {process.stdout.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout} s")


def assert_same_losses(run: dict[int, float], reference: dict[int, float], rel: float = 1e-5) -> None:
    assert run.keys() == reference.keys()
    for step, loss in reference.items():
        assert run[step] == pytest.approx(loss, rel=rel), step


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from volmae.volumes.phantoms import write_phantom_corpus

    folder = tmp_path_factory.mktemp("corpus")
    write_phantom_corpus(folder, count=8, seed=1, size_range=(24, 36), progress=False)
    return folder


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """The reference: 4 epochs (16 steps) of batch 2 in one process, never stopped."""
    out = tmp_path_factory.mktemp("reference")
    run_cli(pretrain_command(corpus, out, "--epochs", "4", "--batch_size", "2"))
    return losses(out)


def test_sigusr1_checkpoints_exits_and_the_rerun_continues_exactly(corpus, tmp_path, uninterrupted):
    out = tmp_path / "run"
    command = pretrain_command(corpus, out, "--epochs", "4", "--batch_size", "2")
    process = start(command)
    wait_for_step(out, 5, process)  # mid-epoch (4 steps per epoch)
    os.kill(process.pid, signal.SIGUSR1)
    sent = time.time()
    assert process.wait(timeout=60) == EXIT_PREEMPTED
    assert time.time() - sent < 30
    stopped_at = load_checkpoint(out / "checkpoint-last.pth")["step"]
    assert int((out / "PREEMPTED").read_text()) == stopped_at and stopped_at < 16
    result = run_cli(command)
    assert f"at step {stopped_at}" in result.stdout and not (out / "PREEMPTED").exists()
    assert_same_losses(losses(out), uninterrupted)


def test_kill_9_then_rerun_resumes_and_ends_with_the_same_loss(corpus, tmp_path, uninterrupted):
    out = tmp_path / "run"
    command = pretrain_command(corpus, out, "--epochs", "4", "--batch_size", "2", "--save_every_steps", "3")
    process = start(command)
    wait_for_step(out, 7, process)
    process.kill()
    process.wait()
    saved = load_checkpoint(out / "checkpoint-last.pth")["step"]
    assert saved in (6, 9)  # a kill while step 9 is being written leaves a half file beside the step-6 one
    result = run_cli(command)
    assert f"at step {saved}" in result.stdout and not list(out.glob(TEMPORARY_GLOB))
    final = losses(out)
    assert final[16] == pytest.approx(uninterrupted[16], rel=1e-5)
    assert all(final[s] == pytest.approx(uninterrupted[s], rel=1e-5) for s in range(saved + 1, 17))


def test_two_nodes_with_c10d_rendezvous_on_localhost(corpus, tmp_path, uninterrupted):
    """Two torchrun agents (two "nodes", one rank each, batch 1) = one process with batch 2."""
    out = tmp_path / "run"
    port = 29651
    agents = [start(["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
                     "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=volmae-test",
                     *pretrain_command(corpus, out, "--epochs", "4", "--batch_size", "1")]) for rank in (0, 1)]
    for agent in agents:
        assert agent.wait(timeout=600) == 0, agent.stdout.read()[-3000:]
    assert_same_losses(losses(out), uninterrupted, rel=1e-4)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_runs_resumes_and_exports_a_plain_encoder(corpus, tmp_path, stage):
    config = f"launch/deepspeed/zero{stage}_cpu.json"
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    args = ["--epochs", "3", "--batch_size", "1", "--accum_iter", "2", "--clip_grad", "1.0", "--deepspeed", config]
    run_cli(torchrun(29660 + stage, *pretrain_command(corpus, full, *args)))
    reference = losses(full)
    assert len(reference) == 6 and (full / "deepspeed" / "latest").exists()

    process = start(torchrun(29670 + stage, *pretrain_command(corpus, stopped, *args)))
    wait_for_step(stopped, 2, process)
    (stopped / "STOP").touch()  # what the SLURM batch script does on USR1: every rank sees it
    process.wait(timeout=120)
    assert (stopped / "PREEMPTED").exists()
    result = run_cli(torchrun(29680 + stage, *pretrain_command(corpus, stopped, *args)))
    assert "resumed from" in result.stdout and "DeepSpeed ZeRO-" + str(stage) in result.stdout
    assert_same_losses(losses(stopped), reference, rel=1e-4)

    encoder = load_checkpoint(stopped / "encoder.pth")
    model = load_checkpoint(stopped / "model.pth")
    assert "blocks.0.attn.qkv.weight" in encoder["model"] and not any(k.startswith("decoder") for k in encoder["model"])
    assert model["model"]["decoder_pred.0.weight"].dtype.is_floating_point and model["step"] == 6
    out = tmp_path / "ft"
    run_cli(["main_finetune.py", "--data_flag", "adrenalmnist3d", "--data_root", str(shared_path("medmnist")),
             "--model", "vit3d_tiny_patch14", "--finetune", str(stopped / "encoder.pth"), "--epochs", "1",
             "--bootstrap", "0", "--train_samples", "64", "--output_dir", str(out),
             *(["--deepspeed", "launch/deepspeed/zero2_cpu.json"] if stage == 2 else [])])
    assert json.loads((out / "results.json").read_text())["test"]["n"] == 298


@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_non_finite_losses_are_skipped_on_all_ranks_then_the_run_stops(corpus, tmp_path, engine):
    """A learning rate that blows the weights up: every rank skips the same steps, then the run stops."""
    out = tmp_path / "run"
    extra = ["--deepspeed", "launch/deepspeed/zero2_cpu.json"] if engine == "zero2" else []
    command = pretrain_command(corpus, out, "--epochs", "10", "--batch_size", "1", "--max_bad_steps", "3", *extra)
    command[command.index("--lr") + 1] = "1e6"
    result = run_cli(torchrun(29690 + len(engine), *command), check=False)
    assert result.returncode != 0 and "3 steps in a row had a non-finite" in result.stderr
    assert "saved the last good state" in result.stderr
    skipped = [r for r in read_log(out / "log.txt") if r["skipped_steps"]]
    assert skipped and sum(r["skipped_steps"] for r in read_log(out / "log.txt")) == 3
    assert (out / ("deepspeed" if extra else "checkpoint-last.pth")).exists()


def test_srun_variables_give_the_rank_without_torchrun():
    srun = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}
    assert rank_environment(srun) == (3, 8, 1)
    assert rank_environment({**srun, "RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "2"}) == (5, 6, 2)
    assert rank_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0)


def squeue_state(job: str, env: dict) -> str | None:
    """The job's state; "" once it has left the queue; None when slurmctld did not answer (busy machine)."""
    result = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return "" if "Invalid job id" in result.stderr else None
    return result.stdout.strip()


def text_of(log: Path) -> str:
    """The job log so far; a read may end inside a multi-byte character the job is still writing."""
    return log.read_text(errors="replace") if log.exists() else ""


def node_state(env: dict) -> str | None:
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=env)
    return result.stdout.strip() if result.returncode == 0 else None


def test_the_sbatch_script_checkpoints_requeues_and_resumes_on_real_slurm(corpus, tmp_path, uninterrupted):
    with local_slurm(tmp_path / "slurm") as env:
        out = tmp_path / "run"
        log = tmp_path / "job.log"
        env = {**env, "OUTPUT_DIR": str(out), "VOLMAE_PYTHON": sys.executable, "NPROC_PER_NODE": "1",
               "OMP_NUM_THREADS": "1", "MASTER_PORT": "29711"}
        submitted = subprocess.run(
            ["sbatch", "--parsable", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}",
             f"--output={log}", "launch/slurm/pretrain.sbatch", "--data_path", str(corpus), *TINY,
             "--epochs", "4", "--batch_size", "2"], cwd=REPO, env=env, capture_output=True, text=True, check=True)
        job = submitted.stdout.strip().split(";")[0]
        deadline = time.time() + 300
        while not ((out / "log.txt").exists() and max(losses(out), default=0) >= 5):
            assert time.time() < deadline, text_of(log) or "no job log"
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
        while "requeueing job" not in text_of(log):
            assert time.time() < deadline, text_of(log)
            time.sleep(0.2)
        stopped_at = load_checkpoint(out / "checkpoint-last.pth")["step"]
        while (state := squeue_state(job, env)) not in ("RUNNING", "COMPLETED"):
            assert time.time() < deadline, text_of(log)
            if state == "PENDING" and node_state(env) == "idle":
                # Skip SLURM's requeue delay, but not within the second the old credential was revoked
                # in: slurmd would refuse the relaunch ("Job credential revoked") and end the job.
                time.sleep(2)
                subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=False)
                break
            time.sleep(0.2)
        while not ("restart 1" in text_of(log) and "finished with status" in text_of(log)
                   and squeue_state(job, env) in ("COMPLETED", "")):
            assert time.time() < deadline + 300, text_of(log)
            time.sleep(0.5)
        text = text_of(log)
        assert f"at step {stopped_at}" in text and "finished with status 0" in text
        assert_same_losses(losses(out), uninterrupted)
        assert (out / "encoder.pth").exists()


def worker_pids(agent: subprocess.Popen) -> dict[int, int]:
    """{local rank: pid} of torchrun's workers, from their environment."""
    pids = {}
    for child in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"LOCAL_RANK="):
                pids[int(entry.split(b"=")[1])] = int(child)
    return pids


@pytest.mark.parametrize("restarts", [0, 1])
def test_a_rank_killed_under_torchrun_ends_the_job_or_is_restarted_from_the_checkpoint(corpus, tmp_path, restarts):
    """kill -9 of rank 1 mid-run: the other rank never hangs in a collective. Without restarts the job ends
    non-zero, naming the rank; with --max_restarts 1 the restarted workers resume from checkpoint-last.pth."""
    out = tmp_path / "run"
    command = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={29690 + restarts}",
               f"--max_restarts={restarts}", *pretrain_command(corpus, out, "--epochs", "6", "--batch_size", "1",
                                                               "--save_every_steps", "2")]
    process = start(command)
    wait_for_step(out, 3, process)
    os.kill(worker_pids(process)[1], signal.SIGKILL)
    killed = time.time()
    output, _ = process.communicate(timeout=600)
    if restarts == 0:
        assert process.returncode != 0 and time.time() - killed < 120
        assert "local_rank: 1" in output and "SIGKILL" in output
    else:
        assert process.returncode == 0, output[-3000:]
        assert "resumed from" in output and (out / "encoder.pth").exists()
