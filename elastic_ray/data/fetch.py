"""Image bytes over http(s): one GET of a canonical URL, within one deadline and a byte limit,
a bounded number at once."""

import http.client
import socket
import threading
import time

from elastic_ray.data.urls import HTTPURL

FETCH_TIMEOUT_S = 10.0
MAX_CONCURRENT_FETCHES = 8
CHUNK_BYTES = 2**16


class FetchError(ValueError):
    """A fetch that failed, was refused by the server, or ran out of time or bytes."""


class Fetcher:
    """GETs image bytes: exactly the canonical URL's request line and Host (one request a fetch,
    no HEAD, redirects not followed), everything from waiting for a slot to the last byte within
    `timeout_s`, at most `max_bytes`, at most `max_concurrent` fetches at once through this Fetcher.

    The deadline covers the slot, connecting, TLS, the status and headers and the body: a timer
    shuts the socket when it passes, however slowly the server sends. Name resolution runs under
    the system resolver's own timeout (it cannot be interrupted), the rest under what is left.
    """

    def __init__(self, timeout_s: float = FETCH_TIMEOUT_S, max_concurrent: int = MAX_CONCURRENT_FETCHES):
        if not timeout_s > 0 or max_concurrent < 1:
            raise ValueError(f"a fetcher needs timeout_s > 0 and max_concurrent >= 1, got {timeout_s}, "
                             f"{max_concurrent}")
        self.timeout_s, self.max_concurrent = timeout_s, max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def get(self, url: HTTPURL, max_bytes: int) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        if not self._slots.acquire(timeout=self.timeout_s):
            raise FetchError(f"{self.max_concurrent} image fetches were in progress for {self.timeout_s} s; try again")
        try:
            return self._get(url, max_bytes, deadline)
        finally:
            self._slots.release()

    def _get(self, url: HTTPURL, max_bytes: int, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if url.scheme == "https":
            import ssl  # here: command lines import this module before parsing their arguments

            connection = http.client.HTTPSConnection(url.host, url.port, timeout=left,
                                                     context=ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(url.host, url.port, timeout=left)
        watchdog = threading.Timer(left, _shut, (connection,))
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.connect()
            connection.request("GET", url.target, headers={
                "Host": url.netloc, "Accept": "image/*", "Accept-Encoding": "identity", "Connection": "close",
                "User-Agent": "elastic-ray"})
            response = connection.getresponse()
            _check_status(url, response)
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(f"image at {url} is {declared} bytes, over the limit of {max_bytes}")
            data = bytearray()
            while len(data) <= max_bytes:
                chunk = response.read(min(CHUNK_BYTES, max_bytes + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
            if len(data) > max_bytes:
                raise FetchError(f"image at {url} is over the limit of {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError
            return bytes(data)
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:
                raise FetchError(f"fetching {url} took over the deadline of {self.timeout_s} s") from None
            raise FetchError(f"cannot fetch {url}: {type(e).__name__}: {e}") from None
        finally:
            watchdog.cancel()
            connection.close()


def _check_status(url: HTTPURL, response: http.client.HTTPResponse) -> None:
    if response.status == 200:
        return
    if response.status in (404, 410):
        raise FetchError(f"missing image: {url} (HTTP {response.status})")
    if 300 <= response.status < 400:
        raise FetchError(f"{url} redirects (HTTP {response.status}) and redirects are not followed")
    raise FetchError(f"cannot fetch {url}: HTTP {response.status} {response.reason}")


def _shut(connection: http.client.HTTPConnection) -> None:
    """Wake a read blocked on the connection's socket (closing alone does not)."""
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
