"""uvicorn's HTTP protocol with a deadline on the request headers, and the uvicorn config the service runs with.

uvicorn (0.54) arms no timer while a request's headers arrive: `timeout_keep_alive` starts only after a
response is complete and is cancelled by the first byte of the next request, so a connection that sends
nothing, or half a request line, or headers without the blank line, stays open for as long as the client
likes (slowloris: a few hundred such sockets hold every file descriptor). `HeadersTimeoutProtocol` arms
`http.headers_timeout_s` when a connection opens and when the first bytes of a next request arrive, and
disarms it once the headers are complete; when it fires it writes a 408 and closes the connection. The body
has its own deadline in the ASGI layer (`service.http.BodyLimit`, `http.body_timeout_s`), where the request
is known and a 408 can go through the app's normal response path.

The deadline travels as an attribute of the uvicorn `Config` (`headers_timeout_s`), which uvicorn hands to
every protocol instance and pickles into `--workers` processes.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional: uvicorn's "auto" falls back to h11 the same way
    HttpToolsProtocol = None

log = logging.getLogger("recsys.service")

DEFAULT_HEADERS_TIMEOUT_S = 10.0
_BODY = b"request headers not received in time\n"
_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY)


class _HeadersTimeout:
    """Mixin over a uvicorn HTTP protocol (both keep `self.cycle`, the request in progress, and `transport`)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.headers_timeout_s = float(getattr(config, "headers_timeout_s", DEFAULT_HEADERS_TIMEOUT_S))
        self._headers_timer: asyncio.TimerHandle | None = None

    def _reading_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._headers_timer is None and self.headers_timeout_s > 0:
            self._headers_timer = self.loop.call_later(self.headers_timeout_s, self._headers_timed_out)

    def _disarm(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            self._disarm()
        elif self._reading_headers():
            self._arm()  # the first bytes of a next request on a kept-alive connection: from here
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle until the next request: uvicorn's timeout_keep_alive covers that

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_timed_out(self) -> None:
        self._headers_timer = None
        if self.transport.is_closing() or not self._reading_headers():
            return
        log.info("closing a connection from %s: request headers not complete within %.1f s",
                 self.client, self.headers_timeout_s)
        self.transport.write(_408)
        self.transport.close()


class HeadersTimeoutH11(_HeadersTimeout, H11Protocol):
    pass


if HttpToolsProtocol is not None:
    class HeadersTimeoutHttpTools(_HeadersTimeout, HttpToolsProtocol):
        pass

    HeadersTimeoutProtocol = HeadersTimeoutHttpTools
else:
    HeadersTimeoutProtocol = HeadersTimeoutH11


def uvicorn_config(app, http_cfg, **kwargs):
    """The uvicorn Config of the service: `http_cfg` (recsys.config.http.HttpConfig) gives the header
    deadline and keep-alive; `kwargs` go to uvicorn.Config as they are. uvicorn's access log stays off: the
    app writes its own (service.http.RequestContext, with the request id)."""
    import uvicorn

    kwargs.setdefault("log_level", "info")
    config = uvicorn.Config(app, http="service.http_protocol:HeadersTimeoutProtocol", access_log=False,
                            timeout_keep_alive=http_cfg.keep_alive_timeout_s, **kwargs)
    config.headers_timeout_s = http_cfg.headers_timeout_s
    return config
