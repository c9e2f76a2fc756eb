"""Logging set-up shared by every process the platform starts (API server, workers, engines, replicas)."""

import logging
import os
import warnings

from app.settings import get_settings


def configure_logging() -> None:
    """LORAPLEX_LOG_LEVEL for our loggers; below DEBUG, the libraries' chatter is silenced."""
    level = get_settings().log_level
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # library chatter (progress bars, deprecation notes) drowns our own log lines
        warnings.filterwarnings("ignore", category=FutureWarning)
        logging.getLogger("huey").setLevel(logging.WARNING)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF conversion's own progress bar
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
