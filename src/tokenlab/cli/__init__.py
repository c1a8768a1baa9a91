"""The ``tokenlab`` command line: one entry point (:func:`main`), one module per sub-command.

``app.py`` assembles the parser and owns the error -> exit-status policy; ``common.py`` declares the runtime
flags shared by the sub-commands; ``models``, ``train``, ``data``, ``segment``, ``eval``, ``tokens``, ``report``,
``eval_ssl`` and ``demo`` each declare one sub-command and its handler. Only this package prints.
"""

from tokenlab.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
