"""Progress bars and logging for long curvature passes (main process only)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from .distributed import is_main_process

T = TypeVar("T")
logger = logging.getLogger("fls_hf")


def _silent() -> bool:
    return not is_main_process() or os.environ.get("FLS_HF_DISABLE_PROGRESS") == "1"


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    """tqdm over `iterable`, silent on other ranks or when FLS_HF_DISABLE_PROGRESS=1."""
    return iter(tqdm(iterable, total=total, desc=desc, disable=_silent(), leave=False))


def example_progress(total: int, desc: str) -> tqdm:
    """A tqdm bar counted in examples (call `.update(n)`), silent where `progress` is."""
    return tqdm(total=total, desc=desc, unit="ex", disable=_silent(), leave=False)


def log_main(message: str, *args: object) -> None:
    if is_main_process():
        logger.info(message, *args)


def warn_main(message: str, *args: object) -> None:
    """A warning on the `fls_hf` logger from the main process only (once per event, not once per rank)."""
    if is_main_process():
        logger.warning(message, *args)
