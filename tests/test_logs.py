"""distill.logs: one handler on the distill logger, root untouched, hub libraries print each message once."""
import logging

from distill.logs import setup_logging


def test_distill_logger_has_one_handler_and_leaves_root_alone(capsys, caplog):
    root_handlers = list(logging.getLogger().handlers)
    setup_logging(False)
    setup_logging(True)  # again: no second handler
    logger = logging.getLogger("distill")
    assert sum(type(h).__name__ == "_DistillHandler" for h in logger.handlers) == 1
    assert logger.level == logging.INFO
    assert logging.getLogger().handlers == root_handlers
    logging.getLogger("distill.some.module").info("hello")
    assert capsys.readouterr().err.count("INFO distill.some.module: hello") == 1
    assert "hello" in caplog.text  # still propagates: pytest (or a caller's handler) sees distill's records
    setup_logging(False)


def test_hub_warning_is_printed_once():
    import huggingface_hub.utils.logging as hub_logging

    class Recorder(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record.getMessage())

    root, hub_root = Recorder(), Recorder()
    logging.getLogger().addHandler(root)  # a root handler (basicConfig, a notebook): it must not get a second copy
    hub_logging._get_library_root_logger().addHandler(hub_root)  # beside the library's own stderr handler
    try:
        setup_logging(False)
        assert hub_logging.get_verbosity() == logging.WARNING
        hub_logging.get_logger("huggingface_hub.test").warning("a hub warning")
        hub_logging.get_logger("huggingface_hub.test").info("below the level")
        assert hub_root.records == ["a hub warning"] and root.records == []
    finally:
        logging.getLogger().removeHandler(root)
        hub_logging._get_library_root_logger().removeHandler(hub_root)


def test_progress_is_tqdm_on_a_terminal_plain_lines_in_a_file_and_nothing_when_off(monkeypatch, capsys):
    import io
    import sys

    from tqdm import tqdm

    import distill.logs as logs

    monkeypatch.setattr(logs, "interactive_stderr", lambda: True)
    bar = logs.progress(range(3), "x")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    monkeypatch.setattr(logs, "interactive_stderr", lambda: False)
    assert isinstance(logs.progress(range(3), "x"), logs.PlainProgress)
    capsys.readouterr()
    assert list(logs.progress(range(3), "quiet", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.undo()
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # redirected: not a terminal
    assert not logs.interactive_stderr()


def test_plain_progress_writes_a_line_per_interval_and_one_at_the_end(capsys):
    import re

    import distill.logs as logs

    assert list(logs.PlainProgress(range(7), "features", unit="batch", every=1e9)) == list(range(7))
    err = capsys.readouterr().err
    assert re.fullmatch(r"features: done 7/7 batch \(100%\) in \d+ s, [0-9.e+]+ batch/s\n", err), err
    list(logs.PlainProgress(range(3), "features", unit="batch", every=0))  # every update is past the interval
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" in ")[0] for line in lines] == [
        "features: 1/3 batch (33%)", "features: 2/3 batch (67%)", "features: 3/3 batch (100%)",
        "features: done 3/3 batch (100%)"]
    with logs.PlainProgress(desc="grid", total=None, every=1e9) as bar:  # tqdm's calls: update, set_postfix
        bar.update(5)
        bar.set_postfix(loss="0.123")
    err = capsys.readouterr().err
    assert err.startswith("grid: done 5 it in") and err.endswith(", loss=0.123\n") and "\r" not in err
