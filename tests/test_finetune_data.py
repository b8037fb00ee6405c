"""distill.finetune.data: seeded stratified label subsets and the step sampler."""
from collections import Counter

from distill.finetune import StepBatchSampler, finetune_data


# ----------------------------------------------------------------------------------------------- data
def test_stratified_subset_has_the_per_class_counts(fmnist_dir):
    d = finetune_data("fashion-mnist", fmnist_dir, 0.01, seed=0, channels=1)
    labels = [d.full_train.labels[i].item() for i in d.train.indices]
    assert d.num_classes == 10 and len(d.train) == 600 and len(d.test) == 10000
    assert Counter(labels) == {c: 60 for c in range(10)}  # Fashion-MNIST: 6,000 per class
    again = finetune_data("fashion-mnist", fmnist_dir, 0.01, seed=0, channels=1)
    other = finetune_data("fashion-mnist", fmnist_dir, 0.01, seed=1, channels=1)
    assert d.train.indices == again.train.indices and d.train.indices != other.train.indices
    assert finetune_data("fashion-mnist", fmnist_dir, 1.0, seed=0, channels=1).train is not None


def test_stratified_subset_of_an_image_folder(rgb_folder):
    d = finetune_data("image-folder", str(rgb_folder), 0.25, seed=0, channels=3)
    assert d.classes == ("cat", "dog", "ship") and len(d.test) == 18
    assert Counter(d.full_train.labels[i].item() for i in d.train.indices) == {0: 3, 1: 3, 2: 3}


def test_step_sampler_gives_full_batches_for_every_step():
    batches = list(StepBatchSampler(n=5, batch_size=8, steps=4, seed=0))
    assert len(batches) == 4 and all(len(b) == 8 for b in batches)
    counts = Counter(i for b in batches for i in b)  # 32 draws from epochs of 5: each index 6 or 7 times
    assert set(counts) == set(range(5)) and max(counts.values()) - min(counts.values()) <= 1
    assert batches == list(StepBatchSampler(5, 8, 4, seed=0)) and batches != list(StepBatchSampler(5, 8, 4, seed=1))
    shards = [list(StepBatchSampler(5, 8, 4, seed=0, rank=r, world=2)) for r in range(2)]
    for step, b in enumerate(batches):  # two processes split each global batch between them
        assert sorted(shards[0][step] + shards[1][step]) == sorted(b)
