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
