"""Retrying one hand-over for as long as its sender still wants it (email and webhooks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type


def while_wanted(wanted: Callable[[], bool], *, retryable: type[BaseException],
                 wait: Callable[[RetryCallState], float], on_retry: Callable[[], Any]
                 ) -> AsyncRetrying:
    """Attempts of one hand-over: iterate it and run each attempt in ``with attempt:``.

    An attempt raising ``retryable`` is tried again after ``wait``, with ``on_retry`` called
    first; the attempts end quietly (no exception) once ``wanted()`` is false.
    """
    return AsyncRetrying(
        retry=retry_if_exception_type(retryable),
        wait=wait,
        stop=lambda _state: not wanted(),
        before_sleep=lambda _state: on_retry(),
        retry_error_callback=lambda _state: None,
    )
