"""retry module: transient versus permanent I/O errors, and retrying the transient ones with backoff and jitter.

An object store that restarts, throttles or drops a connection for a minute must not end an overnight run:
`retrying(fn, window_s)` calls fn again (exponential backoff, full jitter) while the errors are transient
and the window lasts. What is permanent (not found, access denied, a 4xx other than throttling) raises at
once. The classification walks the exception chain, since s3fs and aiobotocore wrap the original error.
"""
from __future__ import annotations

import errno
import random
import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

# Exception class names (anywhere in the MRO) that mean "try again": botocore, aiohttp, urllib3, requests.
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ProxyConnectionError", "ResponseStreamingError", "IncompleteReadError", "HTTPClientError",
    "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ClientOSError",
    "ClientPayloadError", "ServerTimeoutError", "ProtocolError", "NewConnectionError", "ChunkedEncodingError",
}
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# S3 error codes worth retrying (throttling and server-side trouble).
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                    "ServerBusy", "BandwidthLimitExceeded", "503", "500", "502", "504", "429", "408"}
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN}


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _status(err: BaseException) -> tuple[str, Optional[int]]:
    """(S3 error code, HTTP status) of a botocore ClientError-like exception, else ("", None)."""
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return "", None
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code, status if isinstance(status, int) else None


def is_transient(err: BaseException) -> bool:
    """True when the error (or one it wraps) says the service may answer if asked again."""
    for e in _chain(err):
        code, status = _status(e)
        if code or status:
            return code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status in (408, 429)))
        if isinstance(e, _PERMANENT_TYPES):
            return False
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
            return True
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


class TransientExhausted(OSError):
    """A transient error kept coming back for the whole retry window."""


def retrying(fn: Callable[[], T], window_s: float, what: str = "", *, base_s: float = 0.5, cap_s: float = 20.0,
             sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """fn(), retried while it raises transient errors and `window_s` seconds have not passed.

    Permanent errors propagate at once, unchanged. When the window is spent, TransientExhausted says
    what failed, how often and for how long (the last error is chained).
    """
    start = clock()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as err:
            if not is_transient(err):
                raise
            attempt += 1
            waited = clock() - start
            if waited >= window_s:
                raise TransientExhausted(
                    f"{what + ': ' if what else ''}{type(err).__name__}: {err} (transient; {attempt} tries over "
                    f"{waited:.0f}s, compute.retry_window_s={window_s:g})") from err
            sleep(min(random.uniform(0, min(cap_s, base_s * 2 ** (attempt - 1))), max(0.0, window_s - waited)))
