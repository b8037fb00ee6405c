"""Stopping on a signal (`StopOnSignal`); its home is `distill.signals`, shared with fine-tuning. Outside
the loop (start-up, the summary) the command line's own SIGTERM handler ends the command at once with
`SignalStop`, as SIGINT does, and the CLI says what was kept."""
from ..signals import SIGNALS, StopOnSignal  # noqa: F401
