"""The cluster recipes in examples/cluster/: every Accelerate config parses with Accelerate's own loader (an unknown
key or a misspelt value fails) and is consistent; the SLURM script is valid bash and, run with stand-ins for srun,
scontrol and accelerate, starts one launcher per node with that node's machine rank, the first node as the main
process, the total process count, and --resume once the run directory holds a run."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "examples" / "cluster"
CONFIGS = sorted(CLUSTER.glob("*.yaml"))
SLURM = CLUSTER / "slurm-multinode.sh"


def test_there_are_single_and_multi_node_configs():
    assert {p.name for p in CONFIGS} >= {"accelerate-1node-8gpu.yaml", "accelerate-2nodes-8gpu-rank0.yaml",
                                         "accelerate-2nodes-8gpu-rank1.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_parses_with_accelerates_loader(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    cfg = ClusterConfig.from_yaml_file(str(path))  # ValueError on an unknown key, on a bad distributed_type
    assert cfg.distributed_type == DistributedType.MULTI_GPU and cfg.mixed_precision in ("no", "fp16", "bf16")
    assert cfg.num_processes % cfg.num_machines == 0 and 0 <= cfg.machine_rank < cfg.num_machines
    if cfg.num_machines > 1:
        assert cfg.main_process_ip and 1024 <= int(cfg.main_process_port) < 65536


def test_a_misspelt_key_is_refused_by_that_loader(tmp_path):
    """The check above can fail: Accelerate refuses a key it does not know."""
    from accelerate.commands.config.config_args import ClusterConfig

    bad = yaml.safe_load(CONFIGS[0].read_text())
    bad["num_proceses"] = bad.pop("num_processes")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="unknown keys"):
        ClusterConfig.from_yaml_file(str(tmp_path / "bad.yaml"))


def test_the_two_node_configs_differ_only_in_machine_rank():
    a, b = (yaml.safe_load((CLUSTER / f"accelerate-2nodes-8gpu-rank{r}.yaml").read_text()) for r in (0, 1))
    assert (a.pop("machine_rank"), b.pop("machine_rank")) == (0, 1) and a == b


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SLURM)], check=True)


def _fake(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(0o755)


def _run_slurm(tmp_path: Path, run_dir: Path) -> list[list[str]]:
    """The script under stand-ins: srun runs its command once per node with SLURM_NODEID set; accelerate prints its
    arguments. Returns each node's accelerate arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake(bin_dir, "scontrol", 'test "$1 $2 $3" = "show hostnames gpu-a[01-02]" && printf "gpu-a01\\ngpu-a02\\n"\n')
    _fake(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
                           'for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i "$@" > "$OUT/node$i"; done\n')
    _fake(bin_dir, "accelerate", 'printf "%s\\n" "$@"\n')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path), SLURM_NNODES="2",
               SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_JOB_ID="12345", SLURM_GPUS_ON_NODE="4",
               RECIPE="cifar10-ddpm-resnet18", RUN_DIR=str(run_dir))
    done = subprocess.run(["bash", str(SLURM), "--set", "data_root=/shared/c10"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [(tmp_path / f"node{i}").read_text().splitlines() for i in (0, 1)]


def _opt(args: list, name: str) -> str:
    return args[args.index(name) + 1]


def test_slurm_script_starts_one_launcher_per_node_with_its_rank(tmp_path):
    run = tmp_path / "run"
    nodes = _run_slurm(tmp_path, run)
    for rank, args in enumerate(nodes):
        assert _opt(args, "--machine_rank") == str(rank) and _opt(args, "--num_machines") == "2"
        assert _opt(args, "--num_processes") == "8"  # 2 nodes x 4 GPUs
        assert _opt(args, "--main_process_ip") == "gpu-a01" and _opt(args, "--main_process_port") == "22345"
        assert "--multi_gpu" in args
        assert args[args.index("-m"):] == ["-m", "distill.cli", "train", "cifar10-ddpm-resnet18", "-o", str(run),
                                           "--no-progress", "--set", "data_root=/shared/c10"]
    run.mkdir()
    (run / "config.yaml").write_text("steps: 10\n")  # a run started by an earlier job: the next one resumes it
    assert all("--resume" in args for args in _run_slurm(tmp_path, run))
