"""Stopping on a signal (:class:`StopOnSignal`); its home is :mod:`distill.signals`, shared with fine-tuning."""
from ..signals import SIGNALS, StopOnSignal  # noqa: F401
