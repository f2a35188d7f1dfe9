"""A real one-node SLURM cluster on localhost for tests: munged, slurmctld and slurmd from Debian's
packages, with state, spool, sockets and logs in a temporary folder; started and stopped by the test."""
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
MUNGE_KEY = Path("/etc/munge/munge.key")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(folder: Path) -> str:
    host = socket.gethostname().split(".")[0]
    ctl, node = _free_port(), _free_port()
    return f"""ClusterName=volmae-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctl}
SlurmdPort={node}
AuthType=auth/munge
AuthInfo=socket={folder}/munge.sock
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _stop(pid_file: Path) -> None:
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


@contextmanager
def local_slurm(folder: Path):
    """Yields the environment (SLURM_CONF) for sbatch/squeue/scontrol; stops the daemons afterwards."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing or not MUNGE_KEY.exists():
        pytest.skip(f"SLURM is not installed ({', '.join(missing) or MUNGE_KEY}); .ci/run installs it with "
                    f"apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root (SlurmUser=root)")
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["munged", "--force", "-S", str(folder / "munge.sock"), "--pid-file", str(folder / "munged.pid"),
                    "--log-file", str(folder / "munged.log"), "--seed-file", str(folder / "munged.seed"),
                    "--key-file", str(MUNGE_KEY)], check=True)
    try:
        subprocess.run(["slurmctld", "-f", str(conf), "-i"], check=True, env=env)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout
            if state.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the local SLURM node did not come up: {(folder / 'slurmctld.log').read_text()[-2000:]}")
        yield env
    finally:
        for daemon in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            _stop(folder / daemon)
        time.sleep(1)
