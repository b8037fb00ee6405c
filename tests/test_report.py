"""distill report: tables from known metrics.csv / results.json / result.json content, and valid PNG plots."""
import json

import pytest

from distill.cli import main
from distill.report import discover, read_metrics, summarize_finetune, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _distill_run(path, terms=("mse", "at"), probes=True):
    path.mkdir(parents=True)
    header = ["step", *terms, "total", "lr", "grad_norm", "img_per_s", "skipped"]
    rows = []
    for i, step in enumerate((1, 10, 20)):
        vals = [round(1.0 / (i + 1) * (k + 1), 4) for k in range(len(terms))]
        rows.append([step, *vals, round(sum(vals), 4), 1e-3, "" if i == 0 else 0.5, 60.0 + i, 0])
    (path / "metrics.csv").write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    if probes:
        (path / "results.json").write_text(json.dumps({"results": [
            {"name": "resnet18 distilled", "linear_top1": 85.22, "knn_top1": 82.44, "num_train": 12000,
             "num_test": 10000},
            {"name": "resnet18 random init", "linear_top1": 62.59, "knn_top1": 58.16, "num_train": 12000,
             "num_test": 10000}], "train_seconds": 10.0}))
    (path / "checkpoint-20").mkdir()  # never searched
    return path


def _ft(path, label, kind, fraction, seed, last, best=None, steps=500, lr=1e-3):
    path.mkdir(parents=True)
    r = {"label": label, "model_kind": kind, "architecture": "resnet18", "fraction": fraction, "seed": seed,
         "steps": steps, "batch_size": 64, "input_size": 64, "augment": "crop-flip", "optimizer": "adamw", "lr": lr,
         "train_images": int(60000 * fraction), "last_top1": last, "last_top5": 99.0, "best_top1": best or last,
         "best_step": steps, "seconds": 12.5, "history": [{"step": steps, "top1": last, "top5": 99.0}]}
    (path / "result.json").write_text(json.dumps(r))
    return r


@pytest.fixture
def runs(tmp_path):
    _distill_run(tmp_path / "distill" / "qs")
    _distill_run(tmp_path / "distill" / "qs-cos", terms=("mse", "at", "cos"), probes=False)
    sweep = tmp_path / "ft"
    for frac, d_vals, s_vals in ((0.01, (80.0, 82.0), (70.0, 71.0)), (1.0, (91.0, 93.0), (90.0, 90.5))):
        for seed, (d, s) in enumerate(zip(d_vals, s_vals)):
            _ft(sweep / "distilled" / f"frac{frac:g}-seed{seed}", "resnet18 distilled", "exported", frac, seed, d,
                best=d + 1)
            _ft(sweep / "scratch" / f"frac{frac:g}-seed{seed}", "resnet18 scratch", "timm", frac, seed, s)
    teacher = tmp_path / "probe.json"
    teacher.write_text(json.dumps({
        "teacher": "fashion-mnist-ddpm", "train_images": 6000, "test_images": 10000,
        "trained": [{"block": "mid_block", "timestep": 11, "linear_top1": 74.02},
                    {"block": "up_blocks.0", "timestep": 11, "linear_top1": 71.18}],
        "untrained": [{"block": "mid_block", "timestep": 11, "linear_top1": 69.45}]}))
    return tmp_path


def test_discover_classifies_and_searches_below(runs):
    distill_runs, ft = discover([str(runs / "distill"), str(runs / "ft")])
    assert sorted(p.name for p in distill_runs) == ["qs", "qs-cos"]
    assert len(ft) == 8 and all((p / "result.json").is_file() for p in ft)


def test_metrics_csv_reading_keeps_columns_and_blank_cells(runs):
    m = read_metrics(runs / "distill" / "qs" / "metrics.csv")
    assert m["step"] == [1.0, 10.0, 20.0] and m["mse"] == [1.0, 0.5, 0.3333]
    assert m["grad_norm"][0] != m["grad_norm"][0] and m["grad_norm"][1:] == [0.5, 0.5]  # '' -> NaN


def test_report_tables_and_plots(runs):
    out = runs / "report"
    summary = write_report([str(runs / "distill"), str(runs / "ft")], str(out),
                           teacher_probe=str(runs / "probe.json"))
    md = (out / "report.md").read_text()
    # fine-tuning: mean (min-max) over seeds and the difference to scratch at the same fraction and budget
    assert "| resnet18 distilled | 1% | 600 | 2 | 500 | **81.00** (80.00-82.00) | +10.50 | 82.00 | 99.00 |" in md
    assert "| resnet18 distilled | 100% | 60000 | 2 | 500 | **92.00** (91.00-93.00) | +1.75 | 93.00 | 99.00 |" in md
    assert "| resnet18 scratch | 1% | 600 | 2 | 500 | **70.50** (70.00-71.00) | - | 70.50 | 99.00 |" in md
    assert md.index("resnet18 distilled | 1%") < md.index("resnet18 scratch | 1%")
    # distillation: last row of metrics.csv, probes from results.json
    assert "| qs | 20 | final mse | " not in md
    assert "| run | steps | final mse | final at | final total | final cos | img/s |" in md
    assert "| qs | 20 | 0.3333 | 0.6667 | 1 | - | 62.0 | resnet18 distilled: 85.22 / 82.44;" in md
    assert "| qs-cos | 20 | 0.3333 | 0.6667 | 2 | 1 | 62.0 | - |" in md
    # probes: best trained and untrained teacher block, then the students
    assert "| teacher fashion-mnist-ddpm (mid_block@t11, best of 2) | 74.02 | - | 6000 / 10000 |" in md
    assert "| teacher fashion-mnist-ddpm untrained (mid_block@t11, best of 1) | 69.45 | - |" in md
    assert "| resnet18 random init | 62.59 | 58.16 | 12000 / 10000 |" in md
    rows = {(r["label"], r["fraction"]): r for r in summary["finetune"]}
    assert rows[("resnet18 distilled", 0.01)]["last_top1"] == pytest.approx(
        {"mean": 81.0, "min": 80.0, "max": 82.0, "std": 2 ** 0.5, "n": 2})
    assert rows[("resnet18 distilled", 0.01)]["vs_scratch"] == pytest.approx(10.5)
    for name in ("loss_curves", "finetune_fraction", "probes"):
        png = out / f"{name}.png"
        assert summary["plots"][name] == str(png) and f"]({name}.png)" in md
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    assert json.loads((out / "report.json").read_text())["distill_runs"][0]["final"]["mse"] == 0.3333
    assert not list(out.glob(".tmp-*"))


def test_budgets_that_differ_are_not_compared(tmp_path):
    a = _ft(tmp_path / "a", "resnet18 distilled", "exported", 0.1, 0, 80.0, steps=500)
    b = _ft(tmp_path / "b", "resnet18 scratch", "timm", 0.1, 0, 70.0, steps=1000)
    rows = summarize_finetune([{**a, "_dir": "a"}, {**b, "_dir": "b"}])
    assert [r["vs_scratch"] for r in rows] == [None, None]
    write_report([str(tmp_path)], str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "label fraction 10%: runs differ in budget" in md
    assert not (tmp_path / "out" / "loss_curves.png").exists() and not (tmp_path / "out" / "probes.png").exists()
    assert (tmp_path / "out" / "finetune_fraction.png").read_bytes()[:8] == PNG_SIGNATURE


def test_cli_report_and_its_errors(runs, tmp_path, capsys):
    assert main(["report", str(runs / "distill" / "qs"), "--out", str(tmp_path / "o")]) == 0
    assert "loss_curves.png" in capsys.readouterr().out and (tmp_path / "o" / "report.md").is_file()
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no runs found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"foo": 1}))
    assert main(["report", str(runs / "ft"), "--out", str(tmp_path / "o"), "--teacher-probe", str(bad)]) == 2
    assert "--teacher-probe" in capsys.readouterr().err


def test_report_of_real_finetune_runs(rgb_folder, tmp_path):
    from distill.finetune import FinetuneConfig, finetune_sweep

    from ._finetune import fake_export

    exp = fake_export(tmp_path / "student")
    base = dict(dataset="image-folder", data_root=str(rgb_folder), steps=2, batch_size=4, eval_every=0)
    res = finetune_sweep(FinetuneConfig(model=str(exp), **base), str(tmp_path / "ft" / "d"), [1.0], [0, 1],
                         progress=False)
    res += finetune_sweep(FinetuneConfig(model="timm:resnet10t", like=str(exp), **base), str(tmp_path / "ft" / "s"),
                          [1.0], [0], progress=False)
    summary = write_report([str(tmp_path / "ft")], str(tmp_path / "rep"))
    rows = {r["label"]: r for r in summary["finetune"]}
    d = [r["last_top1"] for r in res[:2]]
    assert rows["resnet10t distilled"]["last_top1"]["mean"] == pytest.approx(sum(d) / 2)
    assert rows["resnet10t distilled"]["vs_scratch"] == pytest.approx(sum(d) / 2 - res[2]["last_top1"])
    assert rows["resnet10t scratch"]["seeds"] == [0]


# ----------------------------------------------------------------------------------------------- unreadable inputs
@pytest.mark.parametrize("content,reason", [
    ('{"label": "resnet18 scratch", "fraction": 0.01, "se', "is not valid JSON"),  # cut short
    ("", "is empty"),
    ("[1, 2]", "a JSON object"),
    ('{"label": "x"}', "no fraction, seed"),
    (b"\xff\xfe\x00garbage", "is not valid JSON"),
])
def test_an_unreadable_result_json_is_skipped_with_a_warning_naming_it(runs, caplog, content, reason):
    bad = runs / "ft" / "scratch" / "frac1-seed0" / "result.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level("WARNING", logger="distill.report"):
        summary = write_report([str(runs / "ft")], str(runs / "report"))
    assert f"skipping '{bad}'" in caplog.text and reason in caplog.text
    assert [s["path"] for s in summary["skipped"]] == [str(bad)] and reason in summary["skipped"][0]["reason"]
    rows = {(r["label"], r["fraction"]): r for r in summary["finetune"]}
    assert rows[("resnet18 scratch", 1.0)]["seeds"] == [1]  # the other seed is still reported
    md = (runs / "report" / "report.md").read_text()
    assert "## Skipped (unreadable)" in md and str(bad) in md
    assert json.loads((runs / "report" / "report.json").read_text())["skipped"][0]["path"] == str(bad)


def test_unreadable_distill_run_files_are_skipped_and_the_rest_kept(runs, caplog):
    qs = runs / "distill" / "qs"
    (qs / "results.json").write_text('{"results": [')
    (runs / "distill" / "qs-cos" / "metrics.csv").write_text("")
    with caplog.at_level("WARNING", logger="distill.report"):
        summary = write_report([str(runs / "distill")], str(runs / "report"))
    assert {s["path"] for s in summary["skipped"]} == {str(qs / "results.json"),
                                                       str(runs / "distill" / "qs-cos" / "metrics.csv")}
    assert [r["name"] for r in summary["distill_runs"]] == ["qs"]  # qs-cos had nothing readable left
    assert summary["distill_runs"][0]["final"]["mse"] == 0.3333 and summary["probes"] == []


def test_report_with_nothing_readable_is_an_error_naming_the_files(tmp_path, capsys):
    _ft(tmp_path / "a", "resnet18 scratch", "timm", 0.1, 0, 70.0)
    (tmp_path / "a" / "result.json").write_text("{")
    with pytest.raises(ValueError, match="no readable runs.*result.json.*not valid JSON"):
        write_report([str(tmp_path / "a")], str(tmp_path / "out"))
    assert main(["report", str(tmp_path / "a"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no readable runs" in err and f"'{tmp_path / 'a' / 'result.json'}': is not valid JSON" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_cli_report_skips_a_corrupted_result_with_a_warning(runs, capsys, caplog):
    bad = runs / "ft" / "distilled" / "frac0.01-seed1" / "result.json"
    bad.write_text('{"label": ')
    with caplog.at_level("WARNING", logger="distill.report"):
        assert main(["report", str(runs / "ft"), "--out", str(runs / "o")]) == 0
    assert f"skipping '{bad}': is not valid JSON" in caplog.text and "Traceback" not in capsys.readouterr().err


def test_monitored_run_gets_a_monitor_plot_and_its_column_is_not_a_loss_term(tmp_path):
    """A run trained with monitor_every: metrics.csv's monitor column is no loss term (no panel, no table column),
    monitor.csv (step 0 included) is read and plotted as monitor.png next to the loss curves."""
    run = tmp_path / "mon"
    run.mkdir()
    (run / "metrics.csv").write_text("step,mse,total,lr,grad_norm,img_per_s,skipped,monitor_knn_top1\n"
                                     "1,1.0,1.0,0.001,0.5,60,0,\n2,0.5,0.5,0.001,0.5,60,0,41.5\n")
    (run / "monitor.csv").write_text("step,knn_top1,k,train_images,test_images,seconds\n"
                                     "0,20.0,20,1000,1000,1.0\n2,41.5,20,1000,1000,1.0\n")
    summary = write_report([str(run)], str(tmp_path / "report"))
    assert summary["distill_runs"][0]["loss_terms"] == ["mse", "total"]
    png = tmp_path / "report" / "monitor.png"
    assert summary["plots"]["monitor"] == str(png) and png.read_bytes().startswith(PNG_SIGNATURE)
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.index("(loss_curves.png)") < md.index("(monitor.png)")
    (run / "monitor.csv").unlink()
    assert write_report([str(run)], str(tmp_path / "r3"))["plots"]["monitor"] is None


def test_probe_table_says_which_weights_and_what_each_was_tested_on():
    from distill.report import probe_table

    rows = [{"name": "distilled", "linear_top1": 87.5, "knn_top1": 85.0, "num_train": 60000, "num_test": 2000,
             "weights": "ema", "test": "tested on 2,000 of the 10,000 test images (seeded, stratified)"},
            {"name": "pixels", "linear_top1": 84.4, "knn_top1": 85.1, "num_train": 60000, "num_test": 2000,
             "test": "tested on 2,000 of the 10,000 test images (seeded, stratified)"}]
    table = probe_table(rows).splitlines()
    assert table[0].split("|")[-2].strip() == "weights"
    assert table[2].split("|")[-2].strip() == "ema" and table[3].split("|")[-2].strip() == "-"
    assert table[-1] == "tested on 2,000 of the 10,000 test images (seeded, stratified)."
