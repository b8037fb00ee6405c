"""Tests for distill.teacher.python (``teacher: python:module:factory``) and the teacher keys around it: the small UNet
of examples/my_teacher.py (not diffusers), copied into tmp_path and made importable there, loaded by name with kwargs, weights (safetensors and .pt
with a prefix), its own noise schedule; trained through ``distill.train`` from a recipe and as an ``nn.Module``; its
record in config.yaml and the resume check of its weights; ``distill select`` and the teacher probe on it.

Independent computations: block outputs are compared with the network run by hand on ``x_t`` noised with a schedule
computed here from its betas (DDPM, Ho et al. 2020: ``abar_t = prod(1 - beta_s)``), weights with the tensors saved,
hashes with hashlib on the file.
"""
from __future__ import annotations

import hashlib
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from distill.config import make_recipe
from distill.teacher import load_teacher
from distill.teacher.python import parse_python_source, read_state_dict

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_teacher.py"
# the example's UNet (examples/my_teacher.py, the file users copy), with a factory at test size by default (base 8,
# 16 px) and one that returns no module
UNET_SOURCE = EXAMPLE.read_text() + textwrap.dedent('''


    def make_unet(in_channels=3, base=8, image_size=16):
        return TinyUNet(in_channels=in_channels, base=base, image_size=image_size)


    def not_a_module():
        return "a string"
''')
BLOCKS = ["mid", "up.0"]  # 8x8 (16 channels) and 8x8 (8 channels) at 16 px


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def unet_module(tmp_path, monkeypatch):
    """``my_unet.py`` in tmp_path, importable as ``my_unet`` (tmp_path on sys.path); its path for the file form."""
    path = tmp_path / "pkg" / "my_unet.py"
    path.parent.mkdir()
    path.write_text(UNET_SOURCE)
    monkeypatch.syspath_prepend(str(path.parent))
    sys.modules.pop("my_unet", None)
    yield path
    sys.modules.pop("my_unet", None)


def _saved_weights(path, prefix="", seed=1, **kw):
    """Weights of a seeded TinyUNet saved to ``path`` (.safetensors or .pt) with ``prefix`` on every key."""
    import my_unet

    torch.manual_seed(seed)
    sd = {prefix + k: v for k, v in my_unet.make_unet(**kw).state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return sd


def _linear_abar(T=1000, start=1e-4, end=0.02):
    betas = torch.linspace(start, end, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


# ------------------------------------------------------------------------------------------ loading by name
def test_parse_python_source():
    assert parse_python_source("python:pkg.mod:make") == ("pkg.mod", "make")
    assert parse_python_source("python:/a/b/unet.py:Net.build") == ("/a/b/unet.py", "Net.build")
    for bad in ("python:pkg.mod", "python::make", "python:pkg:1x"):
        with pytest.raises(ValueError, match="python:<module>:<factory>"):
            parse_python_source(bad)


def test_features_equal_the_network_run_by_hand(unet_module):
    teacher = load_teacher("python:my_unet:make_unet", BLOCKS, [11, 50], teacher_kwargs={"base": 8})
    assert (teacher.in_channels, teacher.sample_size) == (3, 16)  # from the network's attributes
    assert [(f.key, f.num_chs, f.size, f.reduction) for f in teacher.feature_info] == [
        ("mid@t11", 16, (8, 8), 2), ("up.0@t11", 8, (8, 8), 2), ("mid@t50", 16, (8, 8), 2), ("up.0@t50", 8, (8, 8), 2)]
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    feats = teacher(x0, generator=torch.Generator().manual_seed(3))
    # by hand: the same noise draw, DDPM's linear schedule computed here, hooks on the bare network
    eps = torch.randn((4, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    abar = _linear_abar()[torch.tensor([11, 11, 50, 50])].float()[:, None, None, None]
    x_t = abar.sqrt() * x0.repeat(2, 1, 1, 1) + (1 - abar).sqrt() * eps
    got = {}
    net = teacher.model
    hooks = [dict(net.named_modules())[b].register_forward_hook(lambda m, i, o, b=b: got.__setitem__(b, o))
             for b in BLOCKS]
    with torch.no_grad():
        net(x_t, torch.tensor([11, 11, 50, 50]))
    for h in hooks:
        h.remove()
    for k, t in enumerate((11, 50)):
        for b in BLOCKS:
            torch.testing.assert_close(feats[f"{b}@t{t}"], got[b][2 * k:2 * k + 2], rtol=1e-4, atol=1e-5)
    assert teacher.source_info == {"kind": "python", "class": "my_unet.TinyUNet", "factory": "python:my_unet:make_unet",
                                   "weights": None, "weights_sha256": None, "code": str(unet_module.resolve()),
                                   "code_sha256": hashlib.sha256(unet_module.read_bytes()).hexdigest()}


def test_file_path_form(unet_module):
    teacher = load_teacher(f"python:{unet_module}:make_unet", ["mid"], [11])
    assert teacher.feature_info[0].num_chs == 16 and teacher.source_info["class"].endswith(".TinyUNet")


@pytest.mark.parametrize("suffix, prefix", [(".safetensors", ""), (".pt", "module."), (".pth", "ema_model.")])
def test_weights_are_loaded_strictly_with_the_prefix_stripped(unet_module, tmp_path, suffix, prefix):
    path = tmp_path / f"w{suffix}"
    saved = _saved_weights(path, prefix)
    teacher = load_teacher("python:my_unet:make_unet", ["mid"], [11], weights=str(path), weights_prefix=prefix or None)
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, saved[prefix + k]), k
    assert teacher.source_info["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_errors_name_the_fix(unet_module, tmp_path):
    pt = tmp_path / "w.pt"
    _saved_weights(pt, "module.")
    with pytest.raises(ValueError, match=r"prefix 'module\.'.*teacher_weights_prefix: 'module\.'"):
        load_teacher("python:my_unet:make_unet", ["mid"], [11], weights=str(pt))
    with pytest.raises(ValueError, match=r"prefix 'ema\.' starts none of the"):
        load_teacher("python:my_unet:make_unet", ["mid"], [11], weights=str(pt), weights_prefix="ema.")
    wide = tmp_path / "wide.safetensors"
    _saved_weights(wide, base=16)
    with pytest.raises(ValueError, match=r"do not fit .* of another shape .*teacher_kwargs"):
        load_teacher("python:my_unet:make_unet", ["mid"], [11], weights=str(wide))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": read_state_dict(pt), "epoch": 3}, ckpt)
    with pytest.raises(ValueError, match=r"not a flat state dict.*ckpt\['state_dict'\]"):
        load_teacher("python:my_unet:make_unet", ["mid"], [11], weights=str(ckpt))
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": _Pickled()}, evil)  # a class that unpickling would import
    with pytest.raises(ValueError, match=r"pickled objects beyond tensors.*Unsupported global.*_Pickled.*"
                                         r"model.state_dict\(\)"):
        read_state_dict(evil)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "none.pt")
    with pytest.raises(ValueError, match=r"suffix '\.npz'"):
        (tmp_path / "w.npz").write_bytes(b"x")
        read_state_dict(tmp_path / "w.npz")


class _Pickled:
    pass


def test_factory_errors(unet_module):
    with pytest.raises(ValueError, match=r"module 'no_such_pkg.unet' cannot be imported.*PYTHONPATH"):
        load_teacher("python:no_such_pkg.unet:make", ["mid"], [11])
    (unet_module.parent / "needs_missing.py").write_text("import no_such_dependency_xyz\n")
    with pytest.raises(ValueError, match=r"'needs_missing' imports 'no_such_dependency_xyz', which is not installed"):
        load_teacher("python:needs_missing:make", ["mid"], [11])
    with pytest.raises(ValueError, match=r"has no attribute 'make_net'; its classes and functions: .*make_unet"):
        load_teacher("python:my_unet:make_net", ["mid"], [11])
    with pytest.raises(ValueError, match=r"returned a str, not an nn.Module"):
        load_teacher("python:my_unet:not_a_module", ["mid"], [11])
    with pytest.raises(ValueError, match=r"teacher_kwargs \{'width': 8\} do not fit make_unet\(in_channels=3"):
        load_teacher("python:my_unet:make_unet", ["mid"], [11], teacher_kwargs={"width": 8})
    with pytest.raises(ValueError, match=r"unknown teacher block 'middle'.*Did you mean 'mid'"):
        load_teacher("python:my_unet:make_unet", ["middle"], [11])
    with pytest.raises(ValueError, match=r"failed on a dry-run input of shape \[1, 1, 16, 16\].*teacher_in_channels"):
        load_teacher("python:my_unet:make_unet", ["mid"], [11], in_channels=1)
    with pytest.raises(ValueError, match=r"teacher_kwargs is set but teacher .* is not a python:module:factory"):
        from .conftest import tiny_unet_config

        load_teacher(tiny_unet_config(), ["mid_block"], [11], teacher_kwargs={"base": 8})


# ------------------------------------------------------------------------------------------- noise schedule
def test_noise_schedule_from_a_mapping_and_a_file(unet_module, tmp_path):
    spec = {"beta_schedule": "linear", "beta_start": 1e-3, "beta_end": 0.03, "num_train_timesteps": 500}
    teacher = load_teacher("python:my_unet:make_unet", ["mid"], [11], noise_schedule=spec)
    assert teacher.num_train_timesteps == 500
    torch.testing.assert_close(teacher.scheduler.alphas_cumprod.double(), _linear_abar(500, 1e-3, 0.03), rtol=1e-5,
                               atol=1e-6)
    cfg = tmp_path / "sched"
    cfg.mkdir()
    (cfg / "scheduler_config.json").write_text('{"_class_name": "PNDMScheduler", "beta_start": 0.00085, '
                                               '"beta_end": 0.012, "beta_schedule": "scaled_linear", '
                                               '"num_train_timesteps": 1000, "skip_prk_steps": true}')
    teacher = load_teacher("python:my_unet:make_unet", ["mid"], [11], noise_schedule=str(cfg))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
    torch.testing.assert_close(teacher.scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5,
                               atol=1e-6)  # diffusers computes in float32
    with pytest.raises(ValueError, match=r"timesteps \[600\] are outside \[0, 500\)"):
        load_teacher("python:my_unet:make_unet", ["mid"], [600], noise_schedule=spec)


@pytest.mark.parametrize("spec, match", [
    ({"beta_shedule": "linear"}, r"unknown key 'beta_shedule'. Did you mean 'beta_schedule'"),
    ({"beta_schedule": "cosine"}, r"beta_schedule 'cosine' is not valid; valid: linear, .*squaredcos_cap_v2"),
    ({"beta_start": 0.02, "beta_end": 0.01}, r"beta_start 0.02 must be below beta_end 0.01"),
    ({"beta_end": 1.5}, r"beta_end must be in \(0, 1\), got 1.5"),
    ({"num_train_timesteps": 0}, r"num_train_timesteps must be an integer >= 2, got 0"),
    ("/no/such/dir", r"neither a scheduler config file nor a directory"),
    (7, r"must be a path to a scheduler config or a mapping"),
])
def test_bad_noise_schedules(unet_module, spec, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_teacher("python:my_unet:make_unet", ["mid"], [11], noise_schedule=spec)


# ------------------------------------------------------------------------------------ recipe, train, resume
def _recipe(rgb_folder, **kw):
    base = dict(dataset="image-folder", data_root=str(rgb_folder), teacher="python:my_unet:make_unet",
                teacher_kwargs={"base": 8}, teacher_blocks=["mid"], timesteps=[11], student="resnet18",
                student_size=32, regressor_width=16, steps=2, batch_size=4, augment="none", warmup_steps=0,
                checkpoint_every=2, log_every=1, mean=[0.5], std=[0.25])
    base.update(kw)
    return make_recipe(base)


def test_recipe_teacher_trains_and_config_records_it(unet_module, rgb_folder, tmp_path):
    from distill.trainer import train

    w = tmp_path / "w.pt"
    _saved_weights(w, "module.")
    recipe = _recipe(rgb_folder, teacher_weights=str(w), teacher_weights_prefix="module.",
                     teacher_scheduler={"beta_schedule": "linear", "num_train_timesteps": 1000})
    train(recipe, str(tmp_path / "run"), progress=False)
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["teacher"] == "python:my_unet:make_unet" and cfg["teacher_kwargs"] == {"base": 8}
    assert cfg["_resolved"]["teacher_source"] == {
        "kind": "python", "class": "my_unet.TinyUNet", "factory": "python:my_unet:make_unet", "weights": str(w),
        "weights_sha256": hashlib.sha256(w.read_bytes()).hexdigest(), "code": str(unet_module.resolve()),
        "code_sha256": hashlib.sha256(unet_module.read_bytes()).hexdigest()}
    # resume with other weights in the same file: refused, naming the changed hash
    _saved_weights(w, "module.", seed=2)
    with pytest.raises(ValueError, match=r"resume=True .*teacher_sha256.*teacher_source"):
        train(make_recipe({**recipe.to_dict(), "steps": 3}), str(tmp_path / "run"), resume=True, progress=False)


def test_module_teacher_through_distill_train(unet_module, rgb_folder, tmp_path):
    import my_unet

    from distill.trainer import train

    torch.manual_seed(0)
    net = my_unet.make_unet()
    recipe = _recipe(rgb_folder, teacher=net, teacher_kwargs={})
    train(recipe, str(tmp_path / "run"), progress=False)  # used to crash in PyYAML writing config.yaml
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["teacher"] == "module:my_unet.TinyUNet"
    assert cfg["_resolved"]["teacher_source"]["kind"] == "module"
    # resume with the same module goes on; with other weights it is refused
    train(make_recipe({**recipe.to_dict(), "steps": 3}), str(tmp_path / "run"), resume=True, progress=False)
    assert (tmp_path / "run" / "checkpoint-3").is_dir()
    with torch.no_grad():
        net.mid.conv1.weight.add_(1.0)
    with pytest.raises(ValueError, match=r"teacher_sha256"):
        train(make_recipe({**recipe.to_dict(), "steps": 4}), str(tmp_path / "run"), resume=True, progress=False)
    with pytest.raises(ValueError, match=r"record of an nn.Module given to distill.train.*python:package"):
        load_teacher("module:my_unet.TinyUNet", ["mid"], [11])


def test_select_and_teacher_probe_on_a_python_teacher(unet_module, rgb_folder, tmp_path):
    from distill.select import probe_teacher, run_selection

    recipe = _recipe(rgb_folder, teacher_blocks=["mid", "up.0"])
    sel = run_selection(tmp_path / "sel", recipe=recipe, timesteps=[11, 50], method="both", images=18,
                        val_images=12, epochs=1, label_free_images=12, batch_size=6, progress=False)
    assert {(r["block"], r["timestep"]) for r in sel.grid["rows"]} == {(b, t) for b in ("mid", "up.0") for t in (11, 50)}
    assert (tmp_path / "sel" / "best_grid.yaml").is_file() and len(sel.label_free) == 4
    from distill.probe import eval_device
    from distill.select import format_selection

    assert sel.report["device"] == sel.grid["device"] == str(eval_device())  # Accelerate's device: the CPU here
    assert format_selection(sel).startswith(f"selection of python:my_unet:make_unet on {eval_device()}")
    res = probe_teacher("python:my_unet:make_unet", ["mid"], [11, 50], dataset="image-folder",
                        data_root=str(rgb_folder), epochs=2, ensemble=True, progress=False)
    assert [r["timestep"] for r in res["rows"]] == [11, 50, "ensemble"] and res["test_images"] == 18


def test_teacher_probe_from_a_recipe_file_uses_its_teacher_keys(unet_module, rgb_folder, tmp_path):
    from distill.probe import eval_device
    from distill.select import format_teacher_probe, probe_teacher

    w = tmp_path / "w.safetensors"
    _saved_weights(w, base=8)
    r = _recipe(rgb_folder, teacher_weights=str(w)).to_dict()
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    res = probe_teacher(str(tmp_path / "r.yaml"), None, [11], epochs=1, progress=False)
    assert [r["block"] for r in res["rows"]] == ["mid"] and res["dataset"] == "image-folder"
    assert res["device"] == str(eval_device()) and f"on {res['device']}\n" in format_teacher_probe(res)
    wrong = _recipe(rgb_folder, teacher_weights=str(w), teacher_kwargs={"base": 16}).to_dict()
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    with pytest.raises(ValueError, match="do not fit the network built by the factory"):  # the recipe's keys apply
        probe_teacher(str(tmp_path / "wrong.yaml"), None, [11], epochs=1, progress=False)


def test_cache_key_covers_the_factory_kwargs(unet_module, rgb_folder):
    """A factory argument that changes no weight (here the declared image_size) still changes the network a user
    asked for: the feature cache's key records teacher_kwargs, so a cache of the other arguments is refused."""
    from distill.build import build_teacher, build_train_data
    from distill.cache import expected_key

    r1 = _recipe(rgb_folder)
    r2 = _recipe(rgb_folder, teacher_kwargs={"base": 8, "image_size": 16})  # the same network, spelled out
    ds, channels = build_train_data(r1)
    teacher = build_teacher(r1, channels)
    k1, k2 = expected_key(r1, ds, teacher, channels), expected_key(r2, ds, teacher, channels)
    assert {k for k in k1 if k1[k] != k2[k]} == {"teacher_kwargs"}
    assert k2["teacher_kwargs"] == {"base": 8, "image_size": 16}


def test_recipe_to_dict_keeps_a_module_teacher_by_reference(unet_module, rgb_folder):
    import my_unet

    net = my_unet.make_unet()
    d = _recipe(rgb_folder, teacher=net, teacher_kwargs={}).to_dict()
    assert d["teacher"] is net  # not a deep copy of its weights
    assert d["teacher_blocks"] == ["mid"]


# --------------------------------------------------------------------------------- a recipe is code: trust
EVIL_SOURCE = textwrap.dedent('''
    import os
    import subprocess
    from os import system
    from subprocess import run

    import torch.nn as nn
    from torch.nn import Conv2d


    class NotAModule:
        def __init__(self, command="true"):
            os.system(command)


    def make(command="true"):
        return nn.Conv2d(3, 3, 1)
''')


@pytest.mark.parametrize("factory", [
    "python:os:system",  # a builtin of the standard library: refused before os is even named
    "python:subprocess:run",  # a Python function, but the standard library
    "python:shutil:rmtree",
    "python:builtins:exec",
    "python:evil:system",  # os.system re-exported by the user's module
    "python:evil:run",  # subprocess.run imported into it
    "python:evil:os.system",  # reached through an imported module
    "python:evil:Conv2d",  # an nn.Module class, but torch's, imported
    "python:evil:NotAModule",  # defined there, but not an nn.Module class: its constructor would run
    "python:evil:subprocess.Popen",
])
def test_a_factory_not_defined_in_the_named_module_is_refused_before_it_is_called(factory, tmp_path, monkeypatch):
    """G07: ``teacher: python:os:system`` ran a shell command before distill complained of the result. Only a
    function or nn.Module class defined in the named module (or file) is called; the rest is refused first."""
    (tmp_path / "evil.py").write_text(EVIL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("evil", None)
    mark = tmp_path / "MARK"
    kwargs = {"command": f"touch {mark}"} if factory.endswith(("system", "NotAModule")) else \
        {"args": ["touch", str(mark)]} if factory.endswith(("run", "Popen")) else \
        {"path": str(tmp_path)} if factory.endswith("rmtree") else {}
    if factory.endswith("exec"):
        kwargs = {"source": f"open({str(mark)!r}, 'w')"}
    with pytest.raises(ValueError, match=r"standard library|defined in|not a function or an nn.Module class") as e:
        load_teacher(factory, ["weight"], [11], teacher_kwargs=kwargs)
    assert not mark.exists() and (tmp_path / "evil.py").exists()
    assert "python:" in str(e.value) and "Fix" in str(e.value)
    # the file form is held to the same rule: names defined in that file only
    if factory.startswith("python:evil:"):
        with pytest.raises(ValueError, match=r"defined in|not a function or an nn.Module class"):
            load_teacher(f"python:{tmp_path / 'evil.py'}:{factory.rsplit(':', 1)[1]}", ["weight"], [11],
                         teacher_kwargs=kwargs)
        assert not mark.exists()
    sys.modules.pop("evil", None)


def test_own_functions_classes_and_class_methods_are_accepted(unet_module):
    (unet_module.parent / "own.py").write_text(textwrap.dedent('''
        from my_unet import TinyUNet


        class Net(TinyUNet):
            @classmethod
            def small(cls):
                return cls(base=8)
    '''))
    sys.modules.pop("own", None)
    for source, channels in (("python:my_unet:TinyUNet", 64), ("python:own:Net", 64), ("python:own:Net.small", 16)):
        assert load_teacher(source, ["mid"], [11]).feature_info[0].num_chs == channels  # 2 x base (32 by default)
    with pytest.raises(ValueError, match=r"'TinyUNet' is defined in 'my_unet', not in 'own'.*Its classes and "
                                         r"functions: Net\."):
        load_teacher("python:own:TinyUNet", ["mid"], [11])
    sys.modules.pop("own", None)


def test_the_code_hash_covers_the_package(tmp_path, monkeypatch):
    """A factory in ``pkg.nets`` that builds its network from ``pkg.layers``: an edit of either file changes
    ``code_sha256`` (every .py file of the top-level package, hashed with its relative path)."""
    from distill.teacher.python import code_record

    pkg = tmp_path / "tpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text("import torch.nn as nn\nWIDTH = 4\n")
    (pkg / "nets.py").write_text(textwrap.dedent('''
        import torch.nn as nn
        from .layers import WIDTH


        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, WIDTH, 1)

            def forward(self, x, t):
                return self.conv(x)


        def make():
            return Net()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))

    def independent():  # hashlib over (relative path, sha256 of the bytes), sorted
        h = hashlib.sha256()
        for f in sorted(pkg.rglob("*.py")):
            h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).hexdigest().encode())
        return h.hexdigest()

    before = load_teacher("python:tpkg.nets:make", ["conv"], [11], in_channels=3, resolution=8).source_info
    assert before["code_sha256"] == independent() and before["code"] == str(pkg.resolve())
    (pkg / "layers.py").write_text("import torch.nn as nn\nWIDTH = 4  # edited\n")
    after = code_record("python:tpkg.nets:make")
    assert after["code_sha256"] == independent() != before["code_sha256"]
    for name in ("tpkg", "tpkg.nets", "tpkg.layers"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("what", ["missing", "unexpected"])
def test_partial_or_extra_weights_are_refused_naming_the_keys(unet_module, tmp_path, what):
    """A weight file without one tensor would leave it at random init (``load_state_dict(strict=False)``); one with
    a tensor the network lacks would drop it. Both are refused, naming the key, through load_teacher."""
    from safetensors.torch import save_file

    sd = _saved_weights(tmp_path / "full.safetensors")
    name = "mid.conv2.weight"
    if what == "missing":
        sd = {k: v for k, v in sd.items() if k != name}
    else:
        sd = {**sd, "mid.extra.weight": torch.zeros(2)}
        name = "mid.extra.weight"
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=rf"1 {what} \(e\.g\. \['{re.escape(name)}'\]\)"):
        load_teacher("python:my_unet:make_unet", ["mid"], [11], weights=str(tmp_path / "w.safetensors"))


def test_an_edited_teacher_source_is_refused_by_resume_and_by_the_cache(unet_module, rgb_folder, tmp_path):
    """The code is part of the teacher: editing the factory's file (weights unchanged; here a forward that scales
    its output, which changes every feature but no tensor) changes the cache key and is refused by --resume."""
    from distill.build import build_teacher, build_train_data
    from distill.cache import expected_key
    from distill.trainer import train

    w = tmp_path / "w.safetensors"
    _saved_weights(w)
    recipe = _recipe(rgb_folder, teacher_weights=str(w))
    train(recipe, str(tmp_path / "run"), progress=False)
    ds, channels = build_train_data(recipe)
    before = expected_key(recipe, ds, build_teacher(recipe, channels), channels)
    unet_module.write_text(UNET_SOURCE.replace("return self.skip(x) + self.conv2(F.silu(self.norm2(h)))",
                                               "return 2 * (self.skip(x) + self.conv2(F.silu(self.norm2(h))))"))
    sys.modules.pop("my_unet", None)
    after = expected_key(recipe, ds, build_teacher(recipe, channels), channels)
    assert {k for k in before if before[k] != after[k]} == {"teacher_code_sha256"}
    config = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"resume=True .*teacher_source.*teacher_settings"):
        train(make_recipe({**recipe.to_dict(), "steps": 3}), str(tmp_path / "run"), resume=True, progress=False)
    assert (tmp_path / "run" / "config.yaml").read_text() == config and not (tmp_path / "run" / "checkpoint-3").exists()


def test_reading_someone_elses_run_imports_no_teacher_code(unet_module, rgb_folder, tmp_path):
    """`distill export`, `distill probe RUN` and `distill report` read a run whose config.yaml names a python:
    teacher without importing it: a module that leaves a mark when imported leaves none (it is importable: the
    commands run with its folder on PYTHONPATH)."""
    import os
    import subprocess

    from distill.trainer import train

    mark = tmp_path / "IMPORTED"
    (unet_module.parent / "marked_unet.py").write_text(f"open({str(mark)!r}, 'a').write('imported\\n')\n" + UNET_SOURCE)
    sys.modules.pop("marked_unet", None)
    train(_recipe(rgb_folder, teacher="python:marked_unet:make_unet"), str(tmp_path / "run"), progress=False)
    assert mark.read_text() == "imported\n"  # training does import it: the mark works
    mark.unlink()
    sys.modules.pop("marked_unet", None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(unet_module.parent), *sys.path]), "OMP_NUM_THREADS": "1"}
    for args in (["export", str(tmp_path / "run"), "-o", str(tmp_path / "export")],
                 ["probe", str(tmp_path / "run"), "--epochs", "1", "--no-progress"],
                 ["report", str(tmp_path / "run"), "-o", str(tmp_path / "report")]):
        proc = subprocess.run([sys.executable, "-m", "distill.cli", *args], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (args[0], proc.stderr[-2000:])
        assert not mark.exists(), f"distill {args[0]} imported the run's teacher code"
    assert (tmp_path / "export" / "model.safetensors").is_file() and (tmp_path / "report" / "report.md").is_file()


def test_a_weight_file_is_hashed_once_until_its_size_or_mtime_changes(tmp_path, monkeypatch):
    """The weights' sha256 is remembered per file (path, size, mtime_ns) in DISTILL_CACHE_DIR: a second call reads
    nothing; a rewritten file (same size, new content and mtime) and a touched one are hashed again; a file written
    within the last 2 s is hashed but not remembered (its next write may keep the mtime)."""
    import os
    import time

    from safetensors.torch import save_file

    import distill.teacher.python as tp

    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    w = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(10.0)}, str(w))
    old = time.time_ns() - 60 * 10 ** 9
    os.utime(w, ns=(old, old))
    first = tp.cached_file_sha256(w)
    assert first == hashlib.sha256(w.read_bytes()).hexdigest()
    reads, real = [], tp.file_sha256
    monkeypatch.setattr(tp, "file_sha256", lambda p: reads.append(p) or real(p))
    assert tp.cached_file_sha256(str(w)) == first and reads == []  # remembered: the file is not read
    save_file({"a": torch.arange(10.0) + 1}, str(w))  # same size, other bytes
    os.utime(w, ns=(old + 10 ** 9, old + 10 ** 9))
    second = tp.cached_file_sha256(w)
    assert second == hashlib.sha256(w.read_bytes()).hexdigest() != first and len(reads) == 1
    assert tp.cached_file_sha256(w) == second and len(reads) == 1
    os.utime(w, ns=(old + 2 * 10 ** 9, old + 2 * 10 ** 9))  # touched: hashed again
    assert tp.cached_file_sha256(w) == second and len(reads) == 2
    save_file({"a": torch.arange(10.0) + 2}, str(w))  # just written: not remembered
    third = tp.cached_file_sha256(w)
    assert third == hashlib.sha256(w.read_bytes()).hexdigest() and tp.cached_file_sha256(w) == third
    assert len(reads) == 4
    (tmp_path / "cache" / tp.SHA256_CACHE).write_text("{not json")  # a damaged cache is ignored, then rewritten
    os.utime(w, ns=(old, old))
    assert tp.cached_file_sha256(w) == third and len(reads) == 5 and tp.cached_file_sha256(w) == third
    assert len(reads) == 5
