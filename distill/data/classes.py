"""Class names -> labels, one numbering for every split: the training split's.

A split read on its own numbers its classes by sorting the names it finds, so a test split missing one class would
shift every later label by one and a probe would score its images against the wrong classes (position, not name).
Readers of a second split pass the training split's class list (``build_dataset(..., classes=train.classes)``), and
`class_index` maps that split's names onto it: a class the split lacks is named in a warning (it is simply not
scored), a class the training split lacks is an error (nothing was trained to recognise it).
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

_logger = logging.getLogger(__name__)


def _names(names: Iterable[str], limit: int = 6) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def class_index(found: Iterable[str], classes: Optional[Sequence[str]], where: str) -> tuple[dict[str, int],
                                                                                            tuple[str, ...]]:
    """``({name: label}, class list)`` of the class names ``found`` in one split (those holding images).

    Args:
        found: the class names this split holds images of.
        classes: the training split's class list (label = position in it); None or empty: this split is numbered
            on its own (names sorted, from 0) and its own list is returned.
        where: the split as messages name it (a folder, a CSV, a Hugging Face split).

    Returns:
        the mapping for every name in ``found``, and the class list the labels index (``classes`` when given).

    Raises:
        ValueError: ``found`` holds names absent from ``classes``; the message names them, both lists and the fix.
    """
    found = sorted(set(found))
    if not classes:
        return {name: k for k, name in enumerate(found)}, tuple(found)
    classes = tuple(classes)
    index = {name: k for k, name in enumerate(classes)}
    extra = [n for n in found if n not in index]
    if extra:
        raise ValueError(
            f"{where} holds class(es) {_names(extra)} that the training split lacks (its classes: {_names(classes)}); "
            f"a probe or classifier fit on the training split cannot score images of a class it never saw. Fix: add "
            f"those classes to the training split, or remove them from {where} (or rename them to the training "
            f"split's names).")
    missing = [n for n in classes if n not in set(found)]
    if missing:
        _logger.warning("%s has no images of class(es) %s of the training split; they are not scored (accuracy is "
                        "over the %d class(es) present, labels still numbered by the training split)", where,
                        _names(missing), len(classes) - len(missing))
    return {name: index[name] for name in found}, classes
