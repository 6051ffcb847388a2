"""http(s) image URLs in one canonical form: the allow-list compares that form and the fetch sends it.

`parse_http_url` decodes and normalises a URL the way a server may read it: the scheme and host
lower-cased (a Unicode host through IDNA, one trailing dot dropped), a default port dropped,
each path segment percent-decoded and re-encoded (every byte outside A-Z a-z 0-9 - . _ ~ as an
uppercase %XX), `.` and `..` segments resolved, empty segments dropped, the fragment dropped
(it is never sent). What a server could read in more than one way is refused rather than
guessed: user information, backslashes, spaces and control characters, an escape that decodes
to a slash, a backslash or another escape (double encoding), a segment that starts with `..`
but is not `..` itself (`..;`, `...`, `.. `) in any reading (decoded bytes, or their Unicode
compatibility form: fullwidth dots and slashes), numeric hosts other than a dotted quad.
"""

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import quote_from_bytes, unquote_to_bytes

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_CHARS = 8192
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")  # a % not followed by two hex digits
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
# Raw in a query besides unreserved characters and escapes (RFC 3986 query: pchar / "/" / "?").
_QUERY_SAFE = "!$&'()*+,;=:@/?%"


class URLError(ValueError):
    """A URL that is not an http(s) URL, or that could be read in more than one way."""


@dataclass(frozen=True)
class HTTPURL:
    """A canonical http(s) URL: `str()` is what is checked, `target` what the request line asks for."""

    scheme: str
    host: str  # lower-case ASCII; an IPv6 address in brackets
    port: int
    path: str  # starts with "/"; no dot or empty segments but a trailing "/"
    query: str = ""

    @property
    def netloc(self) -> str:
        return self.host if self.port == DEFAULT_PORTS[self.scheme] else f"{self.host}:{self.port}"

    @property
    def target(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.target}"

    def under(self, prefix: "HTTPURL") -> bool:
        """Whether this URL lies under `prefix` (same origin; its path the prefix's or below it,
        whole segments only: /images/ holds /images/a.png, not /images2/a.png)."""
        if (self.scheme, self.host, self.port) != (prefix.scheme, prefix.host, prefix.port):
            return False
        folder = prefix.path.rstrip("/")
        return self.path == prefix.path or self.path.startswith(folder + "/")


def parse_http_url(text: str) -> HTTPURL:
    """The canonical form of an http(s) URL; anything else, or anything ambiguous, raises URLError."""
    if not isinstance(text, str):
        raise URLError(f"a URL must be a string, got {type(text).__name__}")
    if len(text) > MAX_URL_CHARS:
        raise URLError(f"the URL is over {MAX_URL_CHARS} characters")
    if any(c <= " " or c == "\x7f" or c == "\\" for c in text):
        raise URLError("a URL may not hold spaces, control characters or backslashes")
    scheme = _SCHEME.match(text)
    if scheme is None or scheme.group(1).lower() not in DEFAULT_PORTS:
        raise URLError("not an http(s) URL")
    rest = text[scheme.end():].split("#", 1)[0]
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, rest = rest[:end], rest[end:]
    path, _, query = rest.partition("?")
    scheme_name = scheme.group(1).lower()
    host, port = _host_and_port(authority, DEFAULT_PORTS[scheme_name])
    return HTTPURL(scheme_name, host, port, _path(path), _query(query))


def _host_and_port(authority: str, default_port: int) -> tuple[str, int]:
    if "@" in authority:
        raise URLError("a URL may not hold user information (user@host)")
    if "%" in authority:
        raise URLError("a URL's host may not be percent-encoded")
    if authority.startswith("["):
        inside, bracket, port = authority[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise URLError(f"bad IPv6 host {authority!r}")
        try:
            host = f"[{ipaddress.IPv6Address(inside).compressed}]"
        except ValueError as e:
            raise URLError(f"bad IPv6 host {authority!r}: {e}") from None
        port = port[1:]
    else:
        host, _, port = authority.partition(":")
        host = _hostname(host)
    if not port:
        return host, default_port
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise URLError(f"bad port {port!r}")
    return host, int(port)


def _hostname(host: str) -> str:
    host = host[:-1] if host.endswith(".") else host
    if not host:
        raise URLError("the URL has no host")
    try:
        # IDNA 2003 (Python's codec): nameprep maps case and compatibility forms, then punycode
        ascii_host = host.encode("idna").decode("ascii").lower() if not host.isascii() else host.lower()
    except UnicodeError as e:
        raise URLError(f"bad host {host!r}: {e}") from None
    labels = ascii_host.split(".")
    if labels[-1].isdigit() or labels[-1].startswith("0x"):  # a number: an IPv4 address in some form
        try:
            if str(ipaddress.IPv4Address(ascii_host)) == ascii_host:
                return ascii_host
        except ValueError:
            pass
        raise URLError(f"a numeric host must be a dotted-quad IPv4 address, got {host!r}")
    if len(ascii_host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise URLError(f"bad host {host!r}")
    return ascii_host


def _readings(segment: bytes) -> list[str]:
    """How a server may read a decoded segment: its bytes as Latin-1 and, when they are UTF-8,
    their Unicode compatibility form (NFKC turns a fullwidth dot into a dot)."""
    readings = [segment.decode("latin-1")]
    try:
        readings.append(unicodedata.normalize("NFKC", segment.decode("utf-8")))
    except UnicodeDecodeError:
        pass
    return readings


def _path(path: str) -> str:
    if _ESCAPE.search(path):
        raise URLError("the URL's path has a % that is not an escape (%XX)")
    segments: list[str] = []
    parts = path.split("/")[1:] if path else [""]
    for index, part in enumerate(parts):
        decoded = unquote_to_bytes(part)
        last = index == len(parts) - 1
        for reading in _readings(decoded):
            if "/" in reading or "\\" in reading:
                raise URLError("the URL's path holds an encoded slash or backslash")
            if "%" in reading:
                raise URLError("the URL's path holds an encoded escape (double encoding)")
            if any(c < " " or c == "\x7f" for c in reading):
                raise URLError("the URL's path holds an encoded control character")
            if reading.startswith("..") and decoded != b"..":
                raise URLError(f"the URL's path segment {part!r} may be read as '..'")
        if decoded == b"..":
            if segments:
                segments.pop()
            if last:
                segments.append("")
        elif decoded in (b".", b""):
            if last:
                segments.append("")
        else:
            segments.append(quote_from_bytes(decoded, safe=""))
    return "/" + "/".join(segments)


def _query(query: str) -> str:
    if _ESCAPE.search(query):
        raise URLError("the URL's query has a % that is not an escape (%XX)")
    encoded = quote_from_bytes(query.encode(), safe=_QUERY_SAFE)
    return re.sub("%[0-9A-Fa-f]{2}", lambda m: m.group(0).upper(), encoded)
