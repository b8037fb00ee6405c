"""Deployment formats of a timm model: ONNX (``model.onnx``), written by ``distill export --onnx``.

The exported student is a stock timm model, so deployment is PyTorch's own exporter run on it:
`torch.onnx.export` with ``dynamo=True`` (the ``torch.export``-based exporter that PyTorch recommends and
makes the default since 2.9; the TorchScript-based one is deprecated), a dynamic batch axis and a stated opset
(`ONNX_OPSET`). The graph maps a normalised image batch to what the timm model returns: for an export
(``num_classes=0``) the pooled features, for a fine-tuned model with a head its logits. `onnx_max_abs_diff`
runs the file with onnxruntime against the torch model on the same input (how ``distill export --onnx`` and the
tests check it). Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime); torch-only at import.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Sequence

from .errors import MissingDependencyError, option
from .version import install_hint

#: the file ``distill export --onnx`` writes next to the timm export (and, for a model above 2 GB, its weights
#: in ``model.onnx.data``: ONNX's protobuf limit)
ONNX_FILE, ONNX_DATA_FILE = "model.onnx", "model.onnx.data"
#: the default ONNX opset: 18 is run by onnxruntime >= 1.14, TensorRT >= 8.6 and OpenVINO >= 2023.0
ONNX_OPSET = 18
#: the opsets ``distill export --onnx --opset`` accepts: torch 2.14's exporter writes 18 and up (asked for 13-17, it
#: wrote 18 and said nothing; `export_onnx` now checks the file)
ONNX_OPSETS = range(18, 24)
#: the graph's input and output names; axis 0 of both is the dynamic batch axis ``batch``
ONNX_INPUT, ONNX_OUTPUT = "image", "output"
#: what ``pip install`` line installs the ONNX exporter and runtime
ONNX_EXTRA_HINT = install_hint("onnx")
#: largest max |onnxruntime - torch| accepted by ``distill export --onnx`` (fp32 on CPU; measured: 1e-7 for
#: ResNet-18, 3e-6 for ViT-Tiny pooled features)
ONNX_ATOL = 1e-4
_PROTOBUF_LIMIT = 2 * 1024 ** 3


def require_onnx(what: Optional[str] = None, runtime: bool = False) -> None:
    """Check that the ONNX exporter (onnx, onnxscript) and, with ``runtime``, onnxruntime are importable.
    ``what``: what needs them, in the message (default: the ``onnx`` switch as the caller spells it, `option`).

    Raises:
        MissingDependencyError: a package is missing; the message names it, ``what`` needed it and the pip extra.
    """
    what = what or option("onnx", flag=True)
    needed = ["onnx", "onnxscript"] + (["onnxruntime"] if runtime else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingDependencyError(f"{what} needs {' and '.join(missing)}, which {verb} not installed. Fix: "
                                     f"{ONNX_EXTRA_HINT}, or drop {what}.")


def export_onnx(model, path, input_size: Sequence[int], opset: int = ONNX_OPSET, batch: int = 2) -> Path:
    """Write ``model`` (any ``nn.Module`` taking one image batch, e.g. a timm model) to the ONNX file ``path``.

    Args:
        model: called as ``model(x)`` with ``x`` of shape ``[B, C, H, W]``, float32, normalised as the model was
            trained (an export's ``pretrained_cfg`` mean/std); put in eval mode here (BatchNorm running stats,
            no dropout).
        path: the ``.onnx`` file; a model above 2 GB keeps its weights in ``<path>.data`` beside it.
        input_size: ``(C, H, W)`` of the input; H and W are fixed in the graph, the batch axis is dynamic.
        opset: the ONNX opset (default `ONNX_OPSET`).
        batch: the batch size of the example traced (>= 2, so the batch axis stays symbolic).

    Returns: ``path``. Input ``image`` ``[batch, C, H, W]``, output ``output`` (``[batch, num_features]`` pooled
    features for ``num_classes=0``, ``[batch, num_classes]`` logits with a head).

    Raises:
        MissingDependencyError: onnx or onnxscript is not installed (see `require_onnx`).
        ValueError: the file torch wrote has another opset than ``opset`` (torch's exporter falls back to its own
            opset, 18 in torch 2.14, when it cannot convert down; valid here: `ONNX_OPSETS`); nothing is kept.
    """
    import torch

    require_onnx("ONNX export")
    model = model.eval()
    x = torch.randn(max(2, int(batch)), *input_size)
    big = sum(p.numel() * p.element_size() for p in model.state_dict().values()) > 0.9 * _PROTOBUF_LIMIT
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          opset_version=int(opset), dynamo=True, external_data=big, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    import onnx

    written = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}.get("")
    if written != int(opset):
        for f in (Path(path), Path(f"{path}.data")):
            f.unlink(missing_ok=True)
        name = option("opset")
        raise ValueError(f"{name} {opset}: torch's exporter wrote opset {written} instead (it cannot convert this "
                         f"model down to {opset}). Fix: {name} {ONNX_OPSETS.start} to {ONNX_OPSETS.stop - 1} "
                         f"(default {ONNX_OPSET}).")
    return Path(path)


def onnx_max_abs_diff(path, model, x=None, input_size: Optional[Sequence[int]] = None, batch: int = 3) -> float:
    """Max absolute difference between onnxruntime (CPU) running ``path`` and ``model(x)`` in torch (float32).

    ``x``: an input ``[B, C, H, W]``; None draws ``batch`` standard-normal images of ``input_size`` (seed 0), a batch
    size other than the traced one, so a fixed batch axis fails here.

    Raises:
        MissingDependencyError: onnxruntime is not installed.
    """
    import torch

    if importlib.util.find_spec("onnxruntime") is None:
        raise MissingDependencyError(f"checking an ONNX file needs onnxruntime. Fix: {ONNX_EXTRA_HINT}.")
    import onnxruntime as ort

    if x is None:
        x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {ONNX_INPUT: x.float().numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x.float()).numpy()
    if got.shape != want.shape:
        raise ValueError(f"ONNX output shape {got.shape} differs from the torch model's {want.shape}")
    return float(abs(got - want).max())
