"""Shared HTTP transport for the hooks: connection-field parsing, one pooled ``requests.Session`` with
urllib3 retries that know which retries are safe, and an optional client-side pace.

Retry policy (:class:`SafeRetry`):

* 429 and 503 mean the server refused the request before doing anything, so every method is retried
  (POST and PATCH included), honouring ``Retry-After`` and, on 429, ``X-RateLimit-Reset``.
* 502 and 504 come from a gateway that may already have passed the request on: only idempotent
  methods (GET, HEAD, OPTIONS, PUT, DELETE) are retried.
* Connection errors (nothing was sent) are retried for every method; read errors and read timeouts
  (the request may have been processed) only for idempotent methods. TLS and other errors are not
  retried.
* All retries of one call share a time budget (``max_retry_time``): a wait that would overrun it ends
  the retries and the last answer (e.g. the 429) is returned to the caller, which raises a plain error.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ResponseError
from urllib3.util.retry import Retry

log = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
NOT_PROCESSED_STATUSES = frozenset({429, 503})  # refused before processing: safe to resend any method
GATEWAY_STATUSES = frozenset({502, 504})  # may have been processed: idempotent methods only
RETRY_STATUSES = NOT_PROCESSED_STATUSES | GATEWAY_STATUSES

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


# --------------------------------------------------------------------------- connection fields


def parse_verify(value: Any, *, field: str = "verify") -> bool | str:
    """``verify`` extra: true (default) / false / a CA bundle path; strings from the UI form too."""
    if value is None or value == "":
        return True
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    return text  # a CA bundle path


def has_userinfo(url: str) -> bool:
    """Does ``url`` (with or without a scheme) carry ``user[:password]@`` before its host? Such a URL must
    not be kept: the host goes into error messages and logs."""
    from urllib.parse import urlsplit

    text = url.strip()
    netloc = urlsplit(text if "://" in text else f"https://{text}").netloc
    return "@" in netloc


USERINFO_HINT = ("holds a user name or password (user:password@ before the host); remove it and put the "
                 "credentials in the connection's own fields")


def parse_number(value: Any, default: float | None, *, field: str, minimum: float = 0) -> float | None:
    """A positive number from an extra that may be an int, a float or a string from the UI form."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"extra {field}={value!r} is not a number") from None
    if not math.isfinite(number):   # float("nan") and float("inf") parse, but no timeout or rate is infinite
        raise ValueError(f"extra {field}={value!r} is not a finite number")
    if number <= minimum:
        raise ValueError(f"extra {field}={value!r} must be greater than {minimum:g}")
    return number


# --------------------------------------------------------------------------- pacing


class Pacer:
    """Space requests at least ``3600 / requests_per_hour`` seconds apart, so that no hour window ever
    holds more than ``requests_per_hour`` requests (ServiceNow counts per hour, per user and API)."""

    def __init__(self, requests_per_hour: float | None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 3600.0 / requests_per_hour if requests_per_hour else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()
        self.waited = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self._clock()
            delay = max(0.0, self._next - now)
            self._next = max(now, self._next) + self.interval
        if delay:
            self.waited += delay
            self._sleep(delay)


# --------------------------------------------------------------------------- retries


class SafeRetry(Retry):
    """urllib3 ``Retry`` that only resends what is safe to resend (see the module docstring), honours
    ``X-RateLimit-Reset`` on 429 when ``Retry-After`` is missing, keeps to a total time budget and
    observes the :class:`Pacer` between attempts."""

    RETRY_AFTER_STATUS_CODES = NOT_PROCESSED_STATUSES

    def __init__(self, *args: Any, max_retry_time: float = 300.0, deadline: float | None = None,
                 pacer: Pacer | None = None, **kwargs: Any):
        kwargs.setdefault("allowed_methods", IDEMPOTENT_METHODS)  # governs read-error retries
        kwargs.setdefault("status_forcelist", RETRY_STATUSES)
        kwargs.setdefault("retry_after_max", max(1, int(max_retry_time)))
        super().__init__(*args, **kwargs)
        self.max_retry_time = max_retry_time
        self.deadline = deadline
        self.pacer = pacer

    def new(self, **kw: Any) -> SafeRetry:
        kw.setdefault("max_retry_time", self.max_retry_time)
        kw.setdefault("pacer", self.pacer)
        # The template's deadline is None: the first retry of a call starts the clock.
        kw.setdefault("deadline", self.deadline or time.monotonic() + self.max_retry_time)
        return super().new(**kw)  # type: ignore[return-value]

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if status_code in NOT_PROCESSED_STATUSES:
            return True
        return status_code in GATEWAY_STATUSES and method.upper() in IDEMPOTENT_METHODS

    def get_retry_after(self, response: Any) -> float | None:
        seconds = super().get_retry_after(response)
        if seconds is None and response.status == 429:
            reset = response.headers.get("X-RateLimit-Reset")
            try:
                seconds = min(max(0.0, float(reset) - time.time()), float(self.retry_after_max))
            except (TypeError, ValueError):
                return None
        return seconds

    def _next_wait(self, response: Any) -> float:
        if response is not None and self.respect_retry_after_header:
            wait = self.get_retry_after(response)
            if wait:
                return wait
        return self.get_backoff_time()

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        wait = new._next_wait(response)
        if time.monotonic() + wait > new.deadline:
            raise MaxRetryError(_pool, url, error or ResponseError(
                f"retry time budget of {self.max_retry_time:g} s exhausted (next wait {wait:.0f} s)"))
        if response is not None:
            log.info("%s %s answered %s; retrying in %.1f s", method, _path(url), response.status, wait)
        elif error is not None:
            log.info("%s %s failed (%s); retrying in %.1f s", method, _path(url), type(error).__name__, wait)
        return new

    def sleep_for_retry(self, response: Any) -> bool:
        wait = self.get_retry_after(response)
        if wait:
            _sleep(wait)
        return bool(wait)

    def _sleep_backoff(self) -> None:
        wait = self.get_backoff_time()
        if wait > 0:
            _sleep(wait)

    def sleep(self, response: Any = None) -> None:
        super().sleep(response)
        if self.pacer is not None:
            self.pacer.wait()


def _sleep(seconds: float) -> None:
    """Every retry wait goes through here (tests replace it to run simulated hours in seconds)."""
    time.sleep(seconds)


def _path(url: str | None) -> str:
    return (url or "").split("?", 1)[0]


# --------------------------------------------------------------------------- session


def build_session(*, verify: bool | str, proxy: str | None, retry: Retry, pool_size: int = 10,
                  user_agent: str = "airflow-provider-defender-servicenow") -> requests.Session:
    """One pooled session; ``verify`` and ``proxies`` are also passed on every request by the hooks,
    because requests lets environment variables override session-level values."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=retry)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.verify = verify
    if proxy:
        session.proxies = {"http": proxy, "https": proxy}
    session.headers.update({"Accept": "application/json", "User-Agent": user_agent})
    return session


def make_retry(*, max_retry_time: float = 300.0, pacer: Pacer | None = None, total: int = 10,
               backoff_factor: float = 0.5, backoff_max: float = 30.0) -> SafeRetry:
    """The retry template: ``total`` attempts, exponential backoff, no retry on TLS or other errors,
    no exception on a final retryable status (the caller turns the last answer into a plain error)."""
    return SafeRetry(total=total, connect=5, read=2, other=0, redirect=0, backoff_factor=backoff_factor,
                     backoff_max=backoff_max, backoff_jitter=0.2, raise_on_status=False,
                     raise_on_redirect=False, max_retry_time=max_retry_time, pacer=pacer)
