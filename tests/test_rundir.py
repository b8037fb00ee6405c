"""Run directories (distill.rundir): an existing run is refused unless resumed or overwritten."""
import pytest

from distill.trainer import RunExistsError, train

from .conftest import fmnist_recipe


def test_existing_run_is_refused(trained_run, fmnist_dir):
    run, _ = trained_run
    with pytest.raises(RunExistsError, match="--resume .* --overwrite"):
        train(fmnist_recipe(fmnist_dir), str(run), progress=False)
