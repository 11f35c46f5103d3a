"""Ignite says "Engine run resuming from iteration 0" when a MONAI engine starts; say "starting" instead (the
resume, if any, is reported by :class:`bundle.handlers.TrainingState`)."""

from __future__ import annotations

import logging
import re

from ignite.engine import Engine


class StartMessage:
    """Replace Ignite's "Engine run resuming from iteration 0, epoch E until M epochs", logged whenever a MONAI
    engine starts (its state exists before ``run``), by "Engine run starting at epoch E+1 of M"."""

    PATTERN = re.compile(r"Engine run resuming from iteration 0, epoch (\d+) until (\d+) epochs")

    def attach(self, engine: Engine) -> None:
        engine.logger.addFilter(self.filter)

    def filter(self, record: logging.LogRecord) -> bool:
        match = self.PATTERN.fullmatch(record.getMessage())
        if match:
            record.msg, record.args = "Engine run starting at epoch %d of %s", (int(match[1]) + 1, match[2])
        return True
