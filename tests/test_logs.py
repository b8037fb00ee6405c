"""distill.logs: one handler on the distill logger, root untouched, hub libraries print each message once."""
import logging
import sys

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


def test_hub_warning_is_printed_once(capsys):
    import huggingface_hub.utils.logging as hub_logging

    setup_logging(False)
    hub = hub_logging.get_logger("huggingface_hub.test")
    handlers = hub_logging._get_library_root_logger().handlers
    old = [h.setStream(sys.stderr) for h in handlers]  # its handler holds the stderr of its creation
    logging.basicConfig()  # even with a root handler (a notebook, another library), no second copy
    try:
        hub.warning("a hub warning")
        assert capsys.readouterr().err.count("a hub warning") == 1
    finally:
        for h in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(h)
        for h, stream in zip(handlers, old):
            h.setStream(stream)
