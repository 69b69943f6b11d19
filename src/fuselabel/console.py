"""How the command talks to its user: the library's log on the terminal, and which errors are the user's."""

from __future__ import annotations

import logging
import os
import sys


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (it may be replaced after the handler is made)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def show_log(quiet: bool) -> None:
    """The library logs; the command shows its messages (only warnings with --quiet)."""
    logger = logging.getLogger("fuselabel")
    if not any(getattr(h, "fuselabel_cli", False) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.fuselabel_cli = True
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:  # the libraries' notices (accelerators found, tips, weight-loading reports) as well
        for name in ("lightning.pytorch", "lightning.fabric", "lightning", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.set_verbosity_error()
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def user_errors() -> tuple[type, ...]:
    """Errors that mean bad input, not a bug. Only modules already loaded can have raised theirs, and
    looking them up this way keeps ``predict`` on an exported ONNX folder free of torch."""
    from .images import ImageError
    from .records import RecordsError

    types = [RecordsError, ImageError, ValueError, FileNotFoundError]
    for module, name in (("fuselabel.bundle", "BundleError"), ("fuselabel.encoders", "EncoderError")):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def reason(err: BaseException) -> str:
    """The error's own message: a DataLoader worker re-raises it wrapped in the worker's traceback."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(name) :] if last.startswith(name) else last
