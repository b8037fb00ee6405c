"""A teacher given as a Hugging Face Hub id (``owner/name``) on a machine that cannot reach the hub: fail fast.

Without this check, diffusers and huggingface_hub retry every file (model index, config, weights, each subfolder)
with growing back-off: about 79 s of doubled warnings ending in a misleading "no file named config.json". One request
with a short timeout (`HUB_TIMEOUT_S`) to the hub's endpoint (``HF_ENDPOINT``, through huggingface_hub's own
HTTP session, so proxies apply) tells first; in offline mode (``HF_HUB_OFFLINE=1``) the hub cache is checked instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

#: seconds the one reachability request may take
HUB_TIMEOUT_S = float(os.environ.get("DISTILL_HUB_TIMEOUT", "5"))
#: files whose presence in the hub cache shows a repo was downloaded (pipeline index or model config)
_MARKERS = ("model_index.json", "config.json", "unet/config.json", "transformer/config.json")


def is_hub_id(source) -> bool:
    """Whether ``source`` reads as a hub id ``owner/name`` (not a packaged name, a path or ``python:``)."""
    return (isinstance(source, str) and source.count("/") == 1 and ":" not in source
            and not source.startswith((".", "/", "~")) and all(source.split("/")))


def in_hub_cache(repo: str) -> bool:
    """Whether the local hub cache (``HF_HUB_CACHE``) holds a snapshot of ``repo``."""
    from huggingface_hub import constants, try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, f, cache_dir=constants.HF_HUB_CACHE), str) for f in _MARKERS)


def _download_hint(repo: str, local: bool = True) -> str:
    """How to get ``repo`` onto a machine without the hub; ``local``: also what to do if it was meant as a local
    folder (left out where `_hub_subject` already said so)."""
    return (f"download it on a machine with network (`hf download {repo} --local-dir DIR`, or "
            f"DDPMPipeline.from_pretrained('{repo}').save_pretrained('DIR')), copy DIR here and set teacher: DIR"
            + (f"; if '{repo}' was meant as a local folder, it does not exist here (a teacher you train: "
               f"tools/train_teacher.py --dataset DATASET --data-root DIR --out {repo} in a source checkout)"
               if local else ""))


def _hub_subject(repo: str) -> "tuple[str, bool]":
    """The start of a hub error for ``repo`` and whether it already covered a local folder. When ``repo``'s owner
    part is a folder here (``runs/teacher`` with ``runs/`` present), the likelier cause comes first: a local teacher
    folder that does not exist (a typo, or not trained yet); then the hub error."""
    owner, name = repo.split("/")
    if not Path(owner).expanduser().is_dir():
        return f"teacher {repo!r} is a hub id", False
    return (f"teacher {repo!r} is not a folder here: '{owner}/' exists but holds no '{name}' (check the path, or "
            f"train it first: tools/train_teacher.py --dataset DATASET --data-root DIR --out {repo}). As a hub id "
            f"it cannot be loaded either", True)


def check_hub_reachable(repo: str, timeout: Optional[float] = None) -> None:
    """Raise at once, with the fix, when a hub teacher cannot be loaded for want of network.

    Offline mode (``HF_HUB_OFFLINE=1``): fine when the hub cache holds ``repo``, else an error. Online: one HEAD
    request to the endpoint with ``timeout`` seconds (default `HUB_TIMEOUT_S`, env ``DISTILL_HUB_TIMEOUT``).

    Raises:
        ValueError: the hub is unreachable (naming the endpoint and the network error, and whether the repo is in
            the hub cache: then set ``HF_HUB_OFFLINE=1``), or offline mode without a cached copy; both say how to
            give a local directory instead.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        if not in_hub_cache(repo):
            subject, local = _hub_subject(repo)
            raise ValueError(f"{subject}: HF_HUB_OFFLINE is set and the hub cache ({constants.HF_HUB_CACHE}) has no "
                             f"copy of it. Fix: {_download_hint(repo, not local)}; or unset HF_HUB_OFFLINE on a "
                             f"machine that can reach {constants.ENDPOINT}.")
        return
    from huggingface_hub.utils import get_session

    timeout = HUB_TIMEOUT_S if timeout is None else timeout
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeout, proxy: the network error kinds vary
        why = " ".join(str(e).split())[:160] or type(e).__name__
        cached = in_hub_cache(repo)
        subject, local = _hub_subject(repo)
        hint = _download_hint(repo, not local)
        fix = (f"it is in the hub cache ({constants.HF_HUB_CACHE}): set HF_HUB_OFFLINE=1 to load it from there; or "
               f"{hint}" if cached else f"{hint}; or, if it was downloaded to the hub cache, set HF_HUB_CACHE to that "
               f"cache and HF_HUB_OFFLINE=1")
        raise ValueError(f"{subject}: the hub ({constants.ENDPOINT}) cannot be reached within {timeout:g} s "
                         f"({type(e).__name__}: {why}). Fix: {fix}.") from None
