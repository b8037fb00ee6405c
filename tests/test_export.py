"""Export of a trained run (distill.export): the exported timm model gives the run's features, carries its
config, loads with a head for fine-tuning; an export replaces only an earlier export (never the run, a folder holding
it, or anything else), falls back past a damaged newest checkpoint saying so, reports a failed write (exit 2, no
temporaries), writes files with the umask's mode, and a damaged export names its file."""
import json
import os
import re
import shutil
import types
from pathlib import Path

import pytest
import timm
import torch

from distill.cli import main
from distill.errors import RunExistsError, UnreadableFileError, WriteError
from distill.export import export_student, load_exported
from distill.trainer import load_trained


def test_export_roundtrip_gives_same_features(trained_run, tmp_path):
    run, _ = trained_run
    model, recipe, resolved = load_trained(str(run))
    out = export_student(str(run), str(tmp_path / "student"))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.student.model(x))
        ref = model.student(x)
        got = reloaded.forward_intermediates(x, indices=model.student.indices, intermediates_only=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    cfg = reloaded.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert tuple(cfg["mean"]) == pytest.approx((0.286,) * 3) and tuple(cfg["std"]) == pytest.approx((0.353,) * 3)
    assert cfg["tag"].startswith("distill-")
    assert "up_blocks.0" in cfg["description"] and "[11]" in cfg["description"]
    meta = json.loads((out / "config.json").read_text())["distill"]
    assert meta["timesteps"] == [11] and meta["steps"] == 40 and meta["data_root"] is None  # absolute: not kept
    # a head for fine-tuning, with the distilled backbone underneath
    head = load_exported(str(out), num_classes=7)
    assert head(x).shape == (2, 7)
    with pytest.raises(FileExistsError, match="pass overwrite=True to replace"):
        export_student(str(run), str(out))


# ----------------------------------------------------------------------------------------------- what an export may replace
def _fake_run(path):
    """What `distill train` leaves (enough for the target checks, which run before anything is loaded)."""
    (path / "checkpoint-2").mkdir(parents=True)
    (path / "checkpoint-2" / "model.safetensors").write_bytes(b"weights")
    (path / "config.yaml").write_text("student: resnet18\n")
    (path / "metrics.csv").write_text("step,total\n1,0.5\n")
    return path


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("target", ["run", "parent", "grandparent"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_never_replaces_the_run_or_a_folder_holding_it(tmp_path, capsys, target, overwrite):
    runs = tmp_path / "runs"
    mine = _fake_run(runs / "mine")
    _fake_run(runs / "other")
    (runs / "NOTES.txt").write_text("my notes")
    before = _tree(tmp_path)
    out = {"run": mine, "parent": runs, "grandparent": tmp_path}[target]
    with pytest.raises(RunExistsError, match="exporting there would replace the run") as info:
        export_student(str(mine), str(out), overwrite=overwrite)
    assert f"'{out}'" in str(info.value) and "Nothing was written" in str(info.value)
    assert main(["export", str(mine), "--out", str(out)] + (["--overwrite"] if overwrite else [])) == 2
    assert "would replace the run" in capsys.readouterr().err
    assert _tree(tmp_path) == before


def _foreign_target(kind, path):
    if kind == "a folder with other files":
        path.mkdir()
        (path / "notes.txt").write_text("mine")
        (path / "config.json").write_text(json.dumps({"distill": {}}))
    elif kind == "a config.json not written by distill":
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
        (path / "model.safetensors").write_bytes(b"x")
    elif kind == "a folder holding another run":
        _fake_run(path / "old-run")
    elif kind == "another run":
        _fake_run(path)
    else:
        path.write_text("a file")
    return path


FOREIGN = {"a folder with other files": "notes.txt", "a config.json not written by distill": "no 'distill' key",
           "a folder holding another run": "holds a distill run", "another run": "holds a distill run",
           "a file": "is a file"}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_export_overwrite_replaces_only_an_earlier_export(tmp_path, kind):
    run = _fake_run(tmp_path / "run")
    out = _foreign_target(kind, tmp_path / "out")
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError) as info:  # RunExistsError is one
        export_student(str(run), str(out), overwrite=True)
    assert f"'{out}'" in str(info.value) and FOREIGN[kind] in str(info.value)
    assert "Nothing was deleted" in str(info.value) and _tree(tmp_path) == before
    with pytest.raises(FileExistsError, match="already exists|holds a distill run"):  # and without --overwrite
        export_student(str(run), str(out))


def test_export_overwrite_of_an_earlier_export(trained_run, tmp_path):
    run, _ = trained_run
    out = export_student(str(run), str(tmp_path / "student"))
    first = (out / "model.safetensors").stat().st_ino
    export_student(str(run), str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (out / "model.safetensors").stat().st_ino != first and not list(tmp_path.glob(".tmp-*"))
    (out / "README.md").write_text("my notes on this export")  # no longer only what an export writes
    with pytest.raises(FileExistsError, match="README.md"):
        export_student(str(run), str(out), overwrite=True)
    assert (out / "README.md").is_file()


# ----------------------------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the trained run (hard links: files are damaged by replacing them, never in place)."""
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, copy_function=os.link)
    return copy


def _replace_truncated(p, keep):
    data = p.read_bytes()
    p.unlink()
    p.write_bytes(data[:keep])


@pytest.mark.parametrize("damage", ["truncated weights", "empty weights", "empty newer directory"])
def test_export_falls_back_past_a_damaged_newest_checkpoint_and_says_so(run_copy, tmp_path, caplog, damage):
    if damage == "empty newer directory":
        (run_copy / "checkpoint-50").mkdir()  # an interrupted copy
        bad, used, file = "checkpoint-50", "checkpoint-40", "empty directory"
    else:
        _replace_truncated(run_copy / "checkpoint-40" / "model.safetensors", 1000 if "truncated" in damage else 0)
        bad, used, file = "checkpoint-40", "checkpoint-20", "model.safetensors"
    with caplog.at_level("WARNING"):
        out = export_student(str(run_copy), str(tmp_path / "student"))
    assert bad in caplog.text and file in caplog.text and f"using {used}" in caplog.text
    meta = json.loads((out / "config.json").read_text())["distill"]
    assert meta["checkpoint"] == used and meta["steps"] == int(used.split("-")[1])


def test_cli_export_says_which_checkpoint_it_used(run_copy, tmp_path, capsys):
    (run_copy / "checkpoint-50").mkdir()  # damaged: skipped
    assert main(["export", str(run_copy), "--out", str(tmp_path / "s")]) == 0
    assert f"exported the student of {run_copy / 'checkpoint-40'} to {tmp_path / 's'}" in capsys.readouterr().out


def test_export_of_a_named_damaged_checkpoint_names_it(run_copy, tmp_path, capsys):
    _replace_truncated(run_copy / "checkpoint-40" / "model.safetensors", 50000)
    with pytest.raises(UnreadableFileError, match="checkpoint-40.*model.safetensors: truncated"):
        export_student(str(run_copy), str(tmp_path / "s"), checkpoint=str(run_copy / "checkpoint-40"))
    assert main(["export", str(run_copy), "--out", str(tmp_path / "s"), "--checkpoint", "checkpoint-40"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: truncated (50000 of" in err and "Traceback" not in err
    _replace_truncated(run_copy / "checkpoint-40" / "optimizer.bin", 100)  # an export needs the weights alone
    out = export_student(str(run_copy), str(tmp_path / "s2"), checkpoint="checkpoint-20")
    assert json.loads((out / "config.json").read_text())["distill"]["steps"] == 20


# ----------------------------------------------------------------------------------------------- write failures, modes
def test_disk_full_during_an_export_exits_2_and_leaves_nothing(trained_run, tmp_path, monkeypatch, capsys):
    import errno

    import timm.models

    def full(model, path, **kw):
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(timm.models, "save_for_hf", full)
    run, _ = trained_run
    with pytest.raises(WriteError) as info:
        export_student(str(run), str(tmp_path / "student"))
    assert info.value.errno == errno.ENOSPC and "checkpoint-40 (about 42." in str(info.value)
    assert "MiB are needed" in str(info.value) and not list(tmp_path.iterdir())
    assert main(["export", str(run), "--out", str(tmp_path / "student")]) == 2
    assert "the disk is full" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_export_to_a_path_under_a_file_names_the_file(trained_run, tmp_path):
    run, _ = trained_run
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(WriteError, match=f"'{tmp_path / 'notes.txt'}' is a file, not a directory"):
        export_student(str(run), str(tmp_path / "notes.txt" / "student"))
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_respect_the_umask(trained_run, tmp_path, umask):
    run, _ = trained_run
    old = os.umask(umask)
    try:
        out = export_student(str(run), str(tmp_path / "student"))
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ----------------------------------------------------------------------------------------------- damaged exports
@pytest.fixture(scope="module")
def an_export(trained_run, tmp_path_factory):
    run, _ = trained_run
    return export_student(str(run), str(tmp_path_factory.mktemp("exp") / "student"))


@pytest.mark.parametrize("damage,error,text", [
    ("truncate weights", UnreadableFileError, "model.safetensors' are truncated"),
    ("empty weights", UnreadableFileError, "model.safetensors' are empty (0 bytes)"),
    ("no weights", FileNotFoundError, "has config.json but no model.safetensors"),
    ("bad json", UnreadableFileError, "is not valid JSON: Expecting ',' delimiter at line 1"),
    ("empty json", UnreadableFileError, "config.json' is empty"),
])
def test_a_damaged_export_names_its_file(an_export, tmp_path, damage, error, text):
    out = tmp_path / "student"
    shutil.copytree(an_export, out, copy_function=os.link)
    if damage == "no weights":
        (out / "model.safetensors").unlink()
    elif "weights" in damage:
        _replace_truncated(out / "model.safetensors", 300000 if damage.startswith("truncate") else 0)
    else:
        (out / "config.json").unlink()
        (out / "config.json").write_text('{"architecture": "resnet18" "num_classes": 0}' if damage == "bad json" else "")
    with pytest.raises(error, match=re.escape(text)) as info:
        load_exported(str(out), num_classes=3)
    assert str(out) in str(info.value) and "distill export" in str(info.value)


# ----------------------------------------------------------------------------------------------- provenance, card, hub
def test_export_provenance_is_the_runs_not_timms_supervised_weights(trained_run, an_export):
    """config.json keeps none of the provenance of timm's default resnet18 weights and records the run's."""
    import yaml

    import distill

    run, _ = trained_run
    cfg = json.loads((an_export / "config.json").read_text())
    timm_default = timm.models.get_pretrained_cfg("resnet18").to_dict()
    inherited = [k for k in ("origin_url", "paper_ids", "paper_name", "hf_hub_id", "license", "notes", "description")
                 if timm_default.get(k) and cfg["pretrained_cfg"].get(k) == timm_default[k]]
    assert not inherited, inherited
    assert "origin_url" not in cfg["pretrained_cfg"] and "hf_hub_id" not in cfg["pretrained_cfg"]
    resolved = yaml.safe_load((run / "config.yaml").read_text())["_resolved"]
    d = cfg["distill"]
    assert d["version"] == distill.__version__ and d["steps"] == 40 and d["weights"] == "live"
    assert d["teacher_sha256"] == resolved["teacher_sha256"] and d["data_sha256"] == resolved["data_sha256"]
    assert d["teacher_blocks"] == ["up_blocks.0"] and d["timesteps"] == [11] and d["batch_size"] == 32
    assert "distilled with distill" in cfg["pretrained_cfg"]["description"]


def test_every_export_has_a_model_card(an_export):
    from distill.export import model_card

    card = (an_export / "README.md").read_text()
    cfg = json.loads((an_export / "config.json").read_text())
    assert card.startswith("---\nlibrary_name: timm\n") and "# resnet18 distilled from a diffusion model" in card
    for text in ("timm.create_model('hf-hub:", "'local-dir:PATH'", "| steps x batch x processes | 40 x 32 x 1 |",
                 cfg["distill"]["teacher_sha256"][:16], "live (not EMA)", "Not measured at export"):
        assert text in card, text
    rows = [{"name": "resnet18 distilled", "linear_top1": 85.22, "knn_top1": 82.44, "k": 20, "num_train": 12000,
             "num_test": 10000}]
    assert "| resnet18 distilled | 85.22 | 82.44 (k=20) | 12000 / 10000 |" in model_card(cfg, rows)


class _FakeHub:
    """A local stand-in for the Hub: HfApi.create_repo / upload_folder copy what would be uploaded to ROOT/REPO."""

    def __init__(self, root, public=()):
        self.root, self.calls, self.public = root, [], set(public)  # public: repos that exist and are public

    def install(self, monkeypatch, fail=None):
        import huggingface_hub
        from huggingface_hub.errors import RepositoryNotFoundError

        hub = self

        def repo_info(api, repo_id, repo_type=None, **kw):
            hub.calls.append(("repo_info", repo_id, repo_type))
            if repo_id not in hub.public and not (hub.root / repo_id).is_dir():
                response = types.SimpleNamespace(headers={}, request=None, status_code=404)
                raise RepositoryNotFoundError(f"404 {repo_id}", response=response)
            return types.SimpleNamespace(id=repo_id, private=repo_id not in hub.public)

        def update_repo_settings(api, repo_id, private=None, repo_type=None, **kw):
            hub.calls.append(("update_repo_settings", repo_id, repo_type, private))
            if private:
                hub.public.discard(repo_id)

        def create_repo(api, repo_id, repo_type=None, private=False, exist_ok=False, **kw):
            hub.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
            if fail:
                raise fail
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, repo_id, folder_path, repo_type=None, allow_patterns=None, commit_message=None, **kw):
            hub.calls.append(("upload_folder", repo_id, repo_type, commit_message))
            dest = hub.root / repo_id
            dest.mkdir(parents=True, exist_ok=True)
            for p in Path(folder_path).iterdir():
                if allow_patterns is None or p.name in allow_patterns:
                    shutil.copy(p, dest / p.name)

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
        monkeypatch.setattr(huggingface_hub.HfApi, "update_repo_settings", update_repo_settings)


def test_push_to_hub_uploads_the_export_as_written(trained_run, tmp_path, monkeypatch, capsys):
    run, _ = trained_run
    hub = _FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    out = tmp_path / "student"
    assert main(["export", str(run), "--out", str(out), "--push-to-hub", "me/resnet18-fmnist", "--private"]) == 0
    assert "pushed to https://huggingface.co/me/resnet18-fmnist" in capsys.readouterr().out
    assert hub.calls[0] == ("repo_info", "me/resnet18-fmnist", "model")  # --private: is it an existing public one?
    assert hub.calls[1] == ("create_repo", "me/resnet18-fmnist", "model", True, True)
    assert hub.calls[2][:3] == ("upload_folder", "me/resnet18-fmnist", "model")
    pushed = tmp_path / "hub" / "me" / "resnet18-fmnist"
    assert sorted(p.name for p in pushed.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for name in ("README.md", "config.json", "model.safetensors"):
        assert (pushed / name).read_bytes() == (out / name).read_bytes()
    a, b = (timm.create_model(f"local-dir:{p}", pretrained=True, num_classes=0).eval() for p in (out, pushed))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_push_to_hub_refuses_a_bad_repo_id_before_exporting(trained_run, tmp_path, monkeypatch, capsys):
    run, _ = trained_run
    hub = _FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    assert main(["export", str(run), "--out", str(tmp_path / "s"), "--push-to-hub", "me/bad name!"]) == 2
    assert "'me/bad name!' is not a Hub repository id; valid: NAMESPACE/NAME" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not hub.calls


def test_a_failed_upload_exits_1_naming_the_repo_and_keeps_the_export(trained_run, tmp_path, monkeypatch, capsys):
    run, _ = trained_run
    _FakeHub(tmp_path / "hub").install(monkeypatch, fail=OSError("401 Unauthorized"))
    out = tmp_path / "s"
    assert main(["export", str(run), "--out", str(out), "--push-to-hub", "me/repo"]) == 1
    err = capsys.readouterr().err
    assert "--push-to-hub me/repo: the upload failed (401 Unauthorized)" in err and "hf auth login" in err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


# ----------------------------------------------------------------------------------------------- safe to publish
def test_private_push_to_an_existing_public_repo_is_refused_before_uploading(trained_run, tmp_path, monkeypatch,
                                                                             capsys):
    """The Hub ignores create_repo(private=True) for an existing repo: --private to a public one uploaded the model
    publicly without a word. Now it is refused (exit 2, the fix named, nothing uploaded, the export kept); with
    --make-private the repo is made private first, then uploaded."""
    run, _ = trained_run
    hub = _FakeHub(tmp_path / "hub", public={"me/open"})
    hub.install(monkeypatch)
    out = tmp_path / "s"
    assert main(["export", str(run), "-o", str(out), "--push-to-hub", "me/open", "--private"]) == 2
    err = capsys.readouterr().err
    assert "--push-to-hub me/open --private: the repository already exists and is public" in err
    assert "Nothing was uploaded. Fix: add --make-private" in err
    assert [c[0] for c in hub.calls] == ["repo_info"] and not (tmp_path / "hub").exists()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    hub.calls.clear()
    assert main(["export", str(run), "-o", str(tmp_path / "s2"), "--push-to-hub", "me/open", "--make-private"]) == 0
    assert [c[0] for c in hub.calls] == ["repo_info", "update_repo_settings", "create_repo", "upload_folder"]
    assert hub.calls[1] == ("update_repo_settings", "me/open", "model", True) and "me/open" not in hub.public
    assert main(["export", str(run), "-o", str(tmp_path / "s3"), "--private"]) == 2  # no upload to apply it to
    assert "--private applies to an upload" in capsys.readouterr().err


def test_an_existing_private_repo_and_a_new_repo_are_pushed_without_a_settings_change(an_export, tmp_path,
                                                                                      monkeypatch):
    from distill.export import push_to_hub

    hub = _FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    push_to_hub(str(an_export), "me/new", private=True)  # created private
    push_to_hub(str(an_export), "me/new", private=True)  # exists, private
    assert [c[0] for c in hub.calls] == ["repo_info", "create_repo", "upload_folder"] * 2


HOSTILE = "evil`` x|y <script>alert(1)</script> <img src=x onerror=alert(1)> [click](http://e.vil) *b* \n# Owned $x$"


def _render(markdown_text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough").render(markdown_text)


def test_model_card_values_render_inert(an_export):
    """Every value the card prints is escaped: a hostile teacher path, dataset, block names and probe row name
    (backticks, |, HTML, a link, a heading, math) render as their own text, with no element of their own and the
    tables keeping their columns (rendered with markdown-it, CommonMark + GFM tables; HTML allowed, as on the Hub)."""
    pytest.importorskip("markdown_it")
    from distill.card import md_code, md_text, model_card

    cfg = json.loads((an_export / "config.json").read_text())
    cfg["architecture"] = "resnet18<b>bold</b>"
    cfg["distill"].update(teacher=HOSTILE, dataset=HOSTILE, teacher_blocks=[HOSTILE], checkpoint=HOSTILE)
    cfg["pretrained_cfg"]["license"] = HOSTILE
    rows = [{"name": HOSTILE, "linear_top1": "<i>1</i>", "knn_top1": "[a](b)", "k": 20, "num_train": 1,
             "num_test": 2}]
    for card in (model_card(cfg), model_card(cfg, rows), model_card(cfg, monitor={"knn_top1": HOSTILE})):
        html = _render(card)
        for live in ("<script", "<img", "<b>", "<i>", 'href="http://e.vil"', 'href="b"', "<em>b</em>"):
            assert live not in html, (live, html)
        assert html.count("<h1>") == 1 and "<h1>resnet18&lt;b&gt;bold&lt;/b&gt; distilled" in html
        assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # shown as text, in place
        for row in re.findall(r"<tr>(.*?)</tr>", html, re.S):  # no cell split by a value's |
            assert row.count("<td>") in (0, 2, 5), row  # the card table, the probe table (weights column)
    assert _render(md_text("see https://e.vil or www.e.vil")).strip() == "<p>see https://e.vil or www.e.vil</p>"
    assert md_text("a|b") == "a\\|b" and md_code("x`y") == "``x`y``" and md_code("`") == "`` ` ``"


def test_config_json_and_card_carry_no_absolute_local_path(trained_run, tmp_path):
    """config.json carried the absolute run_dir (pushed to the Hub as is) beside a cwd-relative checkpoint: now the
    run's and the checkpoint's names only; an absolute data_root and teacher path are not recorded either."""
    from distill.export import public_name

    run, _ = trained_run
    out = export_student(str(run), str(tmp_path / "s"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["distill"]["run"] == run.name and cfg["distill"]["checkpoint"] == "checkpoint-40"
    assert "run_dir" not in cfg["distill"]

    def strings(v):
        if isinstance(v, dict):
            return [s for x in v.values() for s in strings(x)]
        if isinstance(v, (list, tuple)):
            return [s for x in v for s in strings(x)]
        return [v] if isinstance(v, str) else []

    card = (out / "README.md").read_text()
    for text in strings(cfg) + [card]:
        assert str(run.parent) not in text and "/usr/share" not in text, text
    assert public_name("python:/home/me/teachers/t.py:make") == "python:t.py:make"
    assert public_name("/home/me/unet") == "unet" and public_name("google/ddpm-cifar10-32") == "google/ddpm-cifar10-32"
    assert public_name("python:pkg.mod:make") == "python:pkg.mod:make"
