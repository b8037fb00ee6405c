import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from distill.probe import ensemble_probe, extract_features, knn_probe, linear_probe, multi_linear_probe


def _blobs(n_per_class: int, num_classes: int = 3, dim: int = 16, sep: float = 6.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = sep * torch.eye(num_classes, dim)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(y.shape[0], dim, generator=g)
    return x, y


def _brute_force_knn_top1(train_x, train_y, test_x, test_y, k, temperature, num_classes):
    train_n = train_x / train_x.norm(dim=1, keepdim=True)
    correct = 0
    for x, y in zip(test_x, test_y):
        sims = train_n @ (x / x.norm())
        top_sims, top_idx = torch.topk(sims, k)
        scores = torch.zeros(num_classes)
        for s, i in zip(top_sims, top_idx):
            scores[train_y[i]] += torch.exp(s / temperature)
        correct += int(scores.argmax() == y)
    return 100.0 * correct / len(test_y)


def test_linear_probe_separable_blobs():
    train_x, train_y = _blobs(100, seed=0)
    test_x, test_y = _blobs(100, seed=1)
    # 300 samples give few Adam steps: lr 1e-2 instead of the 1e-3 meant for full datasets.
    res = linear_probe(train_x, train_y, test_x, test_y, epochs=20, batch_size=32, lr=1e-2)
    assert res["top1"] > 95.0
    assert res["train_top1"] > 95.0
    assert res["top5"] == 100.0  # 3 classes: top-5 covers every class
    assert (res["epochs"], res["num_train"], res["dim"]) == (20, 300, 16)


def test_linear_probe_random_labels_near_chance():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(200, 16, generator=g), torch.randn(1000, 16, generator=g)
    train_y, test_y = torch.randint(0, 2, (200,), generator=g), torch.randint(0, 2, (1000,), generator=g)
    res = linear_probe(train_x, train_y, test_x, test_y, epochs=20, batch_size=32, lr=1e-2)
    assert res["train_top1"] > res["top1"]  # it fits noise on train, not on test
    assert 40.0 < res["top1"] < 60.0


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(300, 8, generator=g), torch.randn(150, 8, generator=g)
    train_y, test_y = torch.randint(0, 7, (300,), generator=g), torch.randint(0, 7, (150,), generator=g)
    for k in (1, 5, 20):
        res = knn_probe(train_x, train_y, test_x, test_y, k=k, temperature=0.07, num_classes=7, chunk=32)
        expected = _brute_force_knn_top1(train_x, train_y, test_x, test_y, k, 0.07, 7)
        assert res["top1"] == pytest.approx(expected, abs=1e-4)
        assert res["top5"] >= res["top1"]
        assert res["k"] == k


def test_knn_k1_on_train_is_perfect():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 10, (200,), generator=g)
    res = knn_probe(x, y, x, y, k=1)
    assert res["top1"] == 100.0 and res["top5"] == 100.0


def test_knn_chunking_does_not_change_result():
    train_x, train_y = _blobs(50, num_classes=4, sep=1.0, seed=0)
    test_x, test_y = _blobs(50, num_classes=4, sep=1.0, seed=1)
    a = knn_probe(train_x, train_y, test_x, test_y, k=10, chunk=7)
    b = knn_probe(train_x, train_y, test_x, test_y, k=10, chunk=10_000)
    assert a == b
    assert a["top5"] == 100.0  # 4 classes
    assert a["top5"] >= a["top1"]


def test_top5_at_least_top1_many_classes():
    train_x, train_y = _blobs(20, num_classes=10, sep=1.5, seed=0)
    test_x, test_y = _blobs(20, num_classes=10, sep=1.5, seed=1)
    res = linear_probe(train_x, train_y, test_x, test_y, epochs=5, batch_size=32)
    assert res["top5"] >= res["top1"]
    assert res["top5"] < 100.0 or res["top1"] == 100.0


def test_multi_linear_probe_matches_single():
    # Overlapping blobs and pure-noise features: accuracies move with every weight, so they expose any drift.
    train_a, train_y = _blobs(60, sep=1.0, seed=0)
    test_a, test_y = _blobs(60, sep=1.0, seed=1)
    g = torch.Generator().manual_seed(2)
    train_b, test_b = torch.randn(180, 12, generator=g), torch.randn(180, 12, generator=g)
    kw = dict(epochs=5, batch_size=32, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    multi = multi_linear_probe({"a": train_a, "up_blocks.1@t11": train_b}, train_y,
                               {"a": test_a, "up_blocks.1@t11": test_b}, test_y, **kw)
    assert set(multi) == {"a", "up_blocks.1@t11"}
    for key, tr, te in (("a", train_a, test_a), ("up_blocks.1@t11", train_b, test_b)):
        torch.manual_seed(456)
        single = linear_probe(tr, train_y, te, test_y, **kw)
        for m in ("top1", "top5", "train_top1"):
            assert multi[key][m] == pytest.approx(single[m], abs=1e-6)
        assert multi[key]["dim"] == tr.shape[1]


def test_extract_features_order_and_dtype():
    x = torch.arange(40, dtype=torch.float64).reshape(10, 4)
    y = torch.arange(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=False)
    feats, labels = extract_features(lambda b: b * 2, loader, progress=False)
    assert feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert labels.dtype == torch.int64
    torch.testing.assert_close(feats, (x * 2).float())
    assert labels.tolist() == list(range(10))


def test_extract_features_rejects_unpooled_maps():
    loader = DataLoader(TensorDataset(torch.zeros(4, 2, 3, 3), torch.zeros(4)), batch_size=2)
    with pytest.raises(ValueError, match=r"\(2, 2, 3, 3\)"):
        extract_features(lambda b: b, loader, progress=False)


def test_errors():
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="-1.*labelled|labelled.*-1"):
        linear_probe(x, torch.full((10,), -1), x, y)
    with pytest.raises(ValueError, match="-1"):
        knn_probe(x, y, x, torch.full((10,), -1))
    with pytest.raises(ValueError, match=r"10 .*9|9 .*10"):
        linear_probe(x, y[:9], x, y)
    with pytest.raises(ValueError, match=r"10 .*9|9 .*10"):
        knn_probe(x, y, x[:9], y)
    with pytest.raises(ValueError, match=r"k=11.*10"):
        knn_probe(x, y, x, y, k=11)
    with pytest.raises(ValueError, match="num_classes=2"):
        linear_probe(x, y + 1, x, y, num_classes=2)
    with pytest.raises(ValueError, match="keys"):
        multi_linear_probe({"a": x}, y, {"b": x}, y)


def test_ensemble_probe_averages_member_logits():
    g = torch.Generator().manual_seed(0)
    y, yt = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (30,), generator=g)
    tr = {k: torch.randn(60, 5, generator=g) + F.one_hot(y, 5) * s for k, s in (("a", 1.0), ("b", 2.0), ("c", 0.5))}
    te = {k: torch.randn(30, 5, generator=g) + F.one_hot(yt, 5) * s for k, s in (("a", 1.0), ("b", 2.0), ("c", 0.5))}
    res = ensemble_probe(tr, y, te, yt, epochs=5)
    ref = multi_linear_probe(tr, y, te, yt, epochs=5, return_logits=True)
    avg = torch.stack([ref[k]["test_logits"] for k in "abc"]).mean(0)
    assert res["ensemble"]["top1"] == pytest.approx(100 * float((avg.argmax(1) == yt).float().mean()), abs=1e-4)
    assert res["best_member"] == max("abc", key=lambda k: ref[k]["top1"])
    single = ensemble_probe(tr, y, te, yt, members=["b"], epochs=5)
    assert single["ensemble"]["top1"] == pytest.approx(single["members"]["b"]["top1"])


# ------------------------------------------------------------------ device: Accelerate's choice, or the one given
def test_eval_device_is_accelerates_unless_one_is_given(monkeypatch):
    import accelerate

    from distill.probe import eval_device

    assert eval_device() == torch.device(accelerate.PartialState().device)  # the CPU here, a GPU where there is one
    assert eval_device("cpu") == torch.device("cpu")

    class FakeState:  # a machine with a GPU, as Accelerate would report it
        device = torch.device("cuda", 3)

    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    assert eval_device() == torch.device("cuda", 3)
    assert eval_device("cpu") == torch.device("cpu")  # an explicit device wins


def test_knn_runs_on_the_given_device_with_the_same_result():
    train_x, train_y = _blobs(20)
    test_x, test_y = _blobs(10, seed=1)
    assert knn_probe(train_x, train_y, test_x, test_y, k=5, device="cpu") == knn_probe(train_x, train_y, test_x,
                                                                                        test_y, k=5)
    with pytest.raises(RuntimeError):  # the device is used, not ignored: meta tensors cannot be read back
        knn_probe(train_x, train_y, test_x, test_y, k=5, device="meta")
