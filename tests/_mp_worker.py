"""Run by tests/test_trainer_multiprocess.py under torchrun: train a tiny recipe, then dump this rank's weights."""
import sys

import torch
import yaml

from distill.config import make_recipe
from distill.trainer import train


def main(recipe_path: str, out_dir: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    recipe = make_recipe(yaml.safe_load(open(recipe_path)))
    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    train(recipe, out_dir, accelerator=acc, progress=False)
    model = acc.unwrap_model(acc._models[0])
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, f"{out_dir}/rank{acc.process_index}.pt")
    # the next draws of this process's global RNG (noise and augmentation come from it): differ per process
    torch.save(torch.rand(8), f"{out_dir}/rng{acc.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
