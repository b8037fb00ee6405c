"""The prompt embedding of a Stable Diffusion teacher: user-given tensor files (no pickle executed), and the
empty-prompt embedding computed once with the pipeline's CLIP text encoder and cached (teacher directory, else the
distill cache); a clear error when it can be neither read nor computed."""
import json
import sys

import pytest
import torch

from distill.errors import MissingDependencyError
from distill.teacher.loading import load_teacher
from distill.teacher.prompt import EMBEDDING_FILENAME, embedding_cache_files, load_prompt_embedding

from ._tiny_latent import _sd_config, emb, save_sd_pipeline, tiny_cond_unet_config, tiny_vae_config  # noqa: F401


def test_prompt_embedding_files(tmp_path, emb):
    from safetensors.torch import save_file

    save_file({"anything": emb[0]}, str(tmp_path / "e.safetensors"))  # [77, D] is taken as [1, 77, D]
    torch.save(emb, tmp_path / "e.pt")
    for f in ("e.safetensors", "e.pt"):
        torch.testing.assert_close(load_prompt_embedding(str(tmp_path / f), 32), emb)
    t = load_teacher(_sd_config(), ["mid_block"], prompt_embedding=str(tmp_path / "e.pt"))
    torch.testing.assert_close(t.conditioning("encoder_hidden_states"), emb)
    torch.testing.assert_close(t.state_dict()["cond_encoder_hidden_states"], emb)  # hashed by feature caches
    with pytest.raises(ValueError, match="cross_attention_dim is 64"):
        load_prompt_embedding(emb, 64)
    with pytest.raises(ValueError, match=r"expected \[1, L, D\]"):
        load_prompt_embedding(torch.zeros(2, 77, 32))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompt_embedding(str(tmp_path / "nope.pt"))
    torch.save({"a": emb, "b": emb}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="prompt_embedding"):
        load_prompt_embedding(str(tmp_path / "two.pt"))


class _NotATensor:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_prompt_embedding_pickle_is_not_executed(tmp_path, capsys):
    torch.save(_NotATensor(), tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a plain tensor file"):
        load_prompt_embedding(str(tmp_path / "evil.pt"))
    assert "unpickled!" not in capsys.readouterr().out


def test_sd_directory_without_text_encoder_or_cache(tmp_path, monkeypatch):
    d = save_sd_pipeline(tmp_path / "sd", tiny_cond_unet_config(), tiny_vae_config(), embedding=None)
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the sd extra were not installed
    with pytest.raises(MissingDependencyError) as e:
        load_teacher(str(d), ["mid_block"])
    assert 'pip install "diffusion-distill[sd]"' in str(e.value) and "prompt_embedding" in str(e.value)
    assert isinstance(e.value, ValueError)  # the CLI prints it and exits with 2
    monkeypatch.delitem(sys.modules, "transformers")
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="no text_encoder/ and tokenizer/"):
        load_teacher(str(d), ["mid_block"])


def _save_tiny_clip(d):
    """A 6-token CLIP tokenizer and a 2-layer CLIP text encoder (width 32) in tokenizer/ and text_encoder/."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>")
    tok.save_pretrained(d / "tokenizer")
    torch.manual_seed(3)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=6, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1)).eval()
    enc.save_pretrained(d / "text_encoder")
    (d / "vocab.json").unlink()
    (d / "merges.txt").unlink()
    return tok, enc


def test_empty_prompt_embedding_is_computed_once_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    d = save_sd_pipeline(tmp_path / "sd", tiny_cond_unet_config(), tiny_vae_config(), embedding=None)
    tok, enc = _save_tiny_clip(d)
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    ids = tok("", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids[0, 0] == 0 and (ids[0, 1:] == 1).all()  # <|startoftext|> then <|endoftext|> padding, as SD 1.x
    with torch.no_grad():
        ref = enc(ids)[0]  # last_hidden_state [1, 77, 32]
    t = load_teacher(str(d), ["mid_block"])
    torch.testing.assert_close(t.conditioning("encoder_hidden_states"), ref)
    assert (d / EMBEDDING_FILENAME).is_file()
    # read back without transformers: the cache is enough
    monkeypatch.setitem(sys.modules, "transformers", None)
    t2 = load_teacher(str(d), ["mid_block"])
    torch.testing.assert_close(t2.conditioning("encoder_hidden_states"), ref)
    # a changed text encoder makes the cache stale
    cfg = d / "text_encoder" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    with pytest.raises(MissingDependencyError):
        load_teacher(str(d), ["mid_block"])


def test_embedding_cache_falls_back_to_home_cache(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import safetensors.torch

    d = save_sd_pipeline(tmp_path / "sd", tiny_cond_unet_config(), tiny_vae_config(), embedding=None)
    _save_tiny_clip(d)
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):  # the teacher directory is read-only
        if str(filename).startswith(str(d)):
            raise PermissionError(13, "Read-only file system", str(filename))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    t = load_teacher(str(d), ["mid_block"])
    local, home = embedding_cache_files(str(d), d)
    assert not local.exists() and home.is_file() and str(home).startswith(str(tmp_path / "cache"))
    assert not list(d.glob("*.tmp-*"))
    monkeypatch.setitem(sys.modules, "transformers", None)
    torch.testing.assert_close(load_teacher(str(d), ["mid_block"]).conditioning("encoder_hidden_states"),
                               t.conditioning("encoder_hidden_states"))
