"""Two CPU processes (torchrun, gloo) against one process with the same global batch."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distill.config import make_recipe
from distill.trainer import train

from .conftest import tiny_unet_config


def _first_loss(run):
    with open(Path(run) / "metrics.csv") as f:
        return float(next(csv.DictReader(f))["total"])


def test_two_processes_match_one(tmp_path, rgb_folder):
    base = dict(dataset="image-folder", data_root=str(rgb_folder), teacher=tiny_unet_config(3),
                teacher_blocks=["mid_block"], timesteps=[11], student="resnet18", student_size=32,
                regressor_width=16, steps=3, log_every=1, checkpoint_every=3, augment="none", lr=1e-3)
    path = tmp_path / "r2.yaml"
    path.write_text(yaml.safe_dump({**base, "batch_size": 6}))  # per process: global batch 12
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("_mp_worker.py")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(worker), str(path),
                           str(tmp_path / "mp")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "mp" / "rank0.pt")
    r1 = torch.load(tmp_path / "mp" / "rank1.pt")
    for k in r0:  # weights by DDP, BN running stats by distribute_bn before each checkpoint
        assert torch.equal(r0[k], r1[k]), k
    # each process draws its own diffusion noise and augmentation (RNG streams from seed and process index)
    assert not torch.equal(torch.load(tmp_path / "mp" / "rng0.pt"), torch.load(tmp_path / "mp" / "rng1.pt"))
    train(make_recipe({**base, "batch_size": 12}), str(tmp_path / "sp"), progress=False)
    print("step-1 loss: 2 processes", _first_loss(tmp_path / "mp"), "1 process", _first_loss(tmp_path / "sp"))
    # same images at step 1 and same initial weights; noise draws and BN batch statistics differ per process
    assert _first_loss(tmp_path / "mp") == pytest.approx(_first_loss(tmp_path / "sp"), rel=0.03)  # measured: 1.2045 vs 1.2155


README_CPU_LAUNCH = "accelerate launch --multi_gpu --num_processes 2 -m distill.cli train"


def test_the_readme_two_process_cpu_launch_starts_two_processes(tmp_path, rgb_folder):
    """The README's CPU launch (`accelerate launch --cpu --num_processes 2` before, which Accelerate runs as ONE
    process without MPI) really starts and joins two processes: config.yaml records num_processes: 2."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()  # moved from the README
    assert f"`{README_CPU_LAUNCH}" in page  # the command tested here is the one the documentation gives
    recipe = dict(dataset="image-folder", data_root=str(rgb_folder), teacher=tiny_unet_config(3),
                  teacher_blocks=["mid_block"], timesteps=[11], student="resnet18", student_size=32,
                  regressor_width=16, steps=2, batch_size=4, log_every=1, checkpoint_every=2, warmup_steps=0,
                  augment="none", mean=[0.5] * 3, std=[0.25] * 3)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launch, rest = README_CPU_LAUNCH.split(" -m ")
    cmd = [accelerate, *launch.split()[1:], "--main_process_port", "29533", "-m", *rest.split(),
           str(tmp_path / "r.yaml"), "-o", str(tmp_path / "run"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["_resolved"]
    assert resolved["num_processes"] == 2 and resolved["mixed_precision"] == "no"


@pytest.mark.parametrize("env, parent, expected", [
    ({}, {}, 1),
    ({"WORLD_SIZE": "3"}, {}, 3),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1"}, {"MASTER_ADDR": "10.0.0.1"}, 2),  # torchrun on a cluster
    ({"OMPI_COMM_WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, {}, 2),  # mpirun
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, {}, "started one process"),  # --cpu, no MPI
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},  # the launcher replaced
     {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}, "started one process"),      # the shell's address
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"},  # exported in the shell,
     {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}, 1),                            # one process asked for
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "10.0.0.1"}, None, 1),  # the parent's environment is unreadable
])
def test_launched_processes_refuses_a_cpu_launch_that_started_one(monkeypatch, env, parent, expected):
    """`accelerate launch --cpu --num_processes 2` runs one process (Accelerate's simple launcher: several only
    through MPI) and sets MASTER_ADDR for the MPI launch that did not happen: refused, not silently one process.
    A MASTER_ADDR the launcher did not set (exported in the shell, as on clusters) is not refused (it was)."""
    from distill.trainer import accelerator

    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "ACCELERATE_USE_CPU",
                 "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(accelerator, "parent_environ", lambda: parent)
    if isinstance(expected, int):
        assert accelerator.launched_processes() == expected
    else:
        with pytest.raises(ValueError, match=rf"{expected}.*Fix: accelerate launch --multi_gpu --num_processes N"):
            accelerator.launched_processes()


_PROBE = """
from distill.trainer.accelerator import launched_processes
try:
    print("processes:", launched_processes())
except ValueError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("processes, expected", [(1, "processes: 1"), (2, "refused: accelerate launch --cpu")])
def test_a_master_addr_exported_in_the_shell_is_no_multi_process_cpu_launch(tmp_path, processes, expected):
    """Through the real launcher, with MASTER_ADDR / MASTER_PORT exported as on a cluster: `accelerate launch --cpu`
    of one process runs (it was refused: the exported MASTER_ADDR was taken for the launcher's), and `--cpu
    --num_processes 2`, which Accelerate runs as one process, is still refused."""
    (tmp_path / "probe.py").write_text(_PROBE)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29400", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([accelerate, "launch", "--cpu", "--num_processes", str(processes), "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "probe.py")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout, proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("recipe_value, env_value, used", [(None, "bf16", "bf16"), (None, None, "no"),
                                                          ("no", "bf16", "no"), ("fp16", None, "fp16")])
def test_an_unset_mixed_precision_is_accelerates_and_a_set_one_wins(tmp_path, monkeypatch, recipe_value, env_value,
                                                                    used):
    """`accelerate launch --mixed_precision bf16` (ACCELERATE_MIXED_PRECISION) and `accelerate config` used to be
    overridden by the recipe's default "no"; now an unset recipe value leaves it to Accelerate, a set one wins."""
    from accelerate.state import AcceleratorState

    from distill.trainer.accelerator import make_accelerator

    if env_value is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env_value)
    assert make_recipe({}).mixed_precision is None
    try:
        acc = make_accelerator(make_recipe({"mixed_precision": recipe_value}), tmp_path)
        assert acc.mixed_precision == used
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


def test_config_yaml_records_the_precision_accelerate_used(tmp_path, monkeypatch, rgb_folder):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    try:
        train(make_recipe(dict(dataset="image-folder", data_root=str(rgb_folder), teacher=tiny_unet_config(3),
                               teacher_blocks=["mid_block"], timesteps=[11], student="resnet18", student_size=32,
                               regressor_width=16, steps=1, batch_size=4, warmup_steps=0, augment="none",
                               mean=[0.5] * 3, std=[0.25] * 3)), str(tmp_path / "run"), progress=False)
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["mixed_precision"] is None and cfg["_resolved"]["mixed_precision"] == "bf16"
