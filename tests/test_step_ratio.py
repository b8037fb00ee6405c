"""bench/step_ratio.py: the variant arm really runs the variant (its own recipe), both arms are timed, bad input
is one error with exit 2."""
from __future__ import annotations

import pytest

from bench import step_ratio as sr


@pytest.mark.parametrize("args, named", [
    (["quickstart", "--variant", "stepz=3"], "--variant 'stepz=3'"),
    (["quickstart", "--set", "stepz=3", "--variant", "steps=3"], "--set 'stepz=3'"),
    (["no-such-recipe", "--variant", "student_size=32"], "no-such-recipe"),
    (["quickstart", "--variant", "student_size=32", "--rounds", "0"], "--rounds"),
])
def test_bad_input_is_one_error_exit_2(args, named, capsys):
    with pytest.raises(SystemExit) as e:
        sr.main(args)
    assert e.value.code == 2 and named in capsys.readouterr().err


def test_the_variant_arm_trains_the_variant_and_the_ratio_is_of_both_arms(monkeypatch, tmp_path):
    built = []

    def fake_step_fn(name, overrides, n_batches):
        built.append(overrides)
        return (lambda i: {}), None

    monkeypatch.setattr(sr, "step_fn", fake_step_fn)
    # a fake clock: a variant step takes 2 s, a recipe step 1 s
    clock = {"t": 0.0}

    def perf_counter():
        return clock["t"]

    real_interleave = sr.interleave

    def interleave(fns, repeats, warmup=1):
        def timed(fn, cost):
            def g(i):
                clock["t"] += cost
                return fn(i)
            return g
        return real_interleave([timed(fns[0], 2.0), timed(fns[1], 1.0)], repeats, warmup)

    monkeypatch.setattr(sr, "interleave", interleave)
    import bench._common as common
    monkeypatch.setattr(common.time, "perf_counter", perf_counter)
    out = tmp_path / "r.json"
    assert sr.main(["quickstart", "--set", "batch_size=16", "--variant", "student_size=32", "--rounds", "3",
                    "--json", str(out)]) == 0
    assert built == [{"batch_size": 16}, {"batch_size": 16, "student_size": 32}]
    import json
    res = json.loads(out.read_text())["variant_over_recipe"]
    assert res["ratio_of_medians"] == pytest.approx(2.0) and len(res["step_s"]["a"]) == 3


def test_a_missing_dataset_is_one_line_and_exit_2(capsys, tmp_path):
    assert sr.main(["quickstart", "--variant", "student_size=32", "--set", f"data_root={tmp_path / 'none'}",
                    "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("step_ratio.py: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1
