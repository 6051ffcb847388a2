"""Safe image loading for untrusted rows and requests: bounded reads, a pixel limit checked on
the header before any pixel is decoded, a format allow-list, and remote fetches only from
allow-listed prefixes (http(s) URLs compared and fetched in their canonical form, `data/urls.py`,
by one bounded GET, `data/fetch.py`).

Every failure raises `ImageError` with a message fit for a row's `error` column.
"""

import base64
import binascii
import io
import posixpath
from dataclasses import dataclass, field
from functools import cached_property

from PIL import Image

from elastic_ray.data.fetch import Fetcher, FetchError
from elastic_ray.data.local_files import FileRefused, open_regular
from elastic_ray.data.urls import HTTPURL, URLError, parse_http_url

MAX_PIXELS = 25_000_000
MAX_BYTES = 64 * 2**20
# Longer side over shorter. A processor that resizes the short side to its input size makes a
# thin image huge.
MAX_ASPECT_RATIO = 50
# Decoders for formats outside this list (EPS runs Ghostscript, for one) are never reached.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image that is missing, unreadable, too large or not allowed."""


def decode_image(data, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> an RGB PIL image, fully decoded. The size is checked from the header first."""
    if data is None:
        raise ImageError("missing image")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"image must be encoded bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("empty image")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageError(f"image over the pixel limit: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"undecodable image: not one of {', '.join(FORMATS)}") from e
    except Exception as e:
        raise ImageError(f"undecodable image: {type(e).__name__}: {e}") from e
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
        raise ImageError(f"image is {width}x{height}: the aspect ratio is over {MAX_ASPECT_RATIO}")
    try:
        image.load()
        return image.convert("RGB")
    except Exception as e:
        raise ImageError(f"undecodable image ({image.format} {width}x{height}): {type(e).__name__}: {e}") from e


def data_url_bytes(url: str, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a `data:image/<type>;base64,<payload>` URL, at most `max_bytes` of them.

    The payload's length is checked before it is decoded.
    """
    head, comma, payload = url.partition(",")
    if not comma or not head.startswith("data:") or not head.endswith(";base64"):
        raise ImageError("a data URL must look like data:image/<type>;base64,<payload>")
    media_type = head[len("data:"): -len(";base64")]
    if media_type and not media_type.startswith("image/"):
        raise ImageError(f"data URL of type {media_type!r}, not an image")
    if len(payload) > 4 * ((max_bytes + 2) // 3):
        raise ImageError(f"data URL image is over the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data URL payload is not valid base64: {e}") from e
    if len(data) > max_bytes:
        raise ImageError(f"data URL image is over the limit of {max_bytes} bytes")
    return data


def _is_url(path: str) -> bool:
    return "://" in path


def _is_http(path: str) -> bool:
    return path[:8].lower().startswith(("http://", "https://"))


def _normalize(path: str) -> str:
    """A URL or local path with `.`/`..` segments resolved, so a prefix check cannot be escaped."""
    if _is_url(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return posixpath.normpath(posixpath.abspath(path))


@dataclass(frozen=True)
class ImageSource:
    """Where image paths may be read from.

    A path is read only if, after resolving `..`, it lies under one of `allowed` (local
    directories or URL prefixes such as `s3://bucket/images/`); relative paths are taken
    under `root`. A local path is read only if it is still under a local folder of `allowed`
    once its symlinks are resolved, and only if it is a regular file (see `local_files`).
    `storage_options` maps a protocol to its fsspec options (`{"s3": {"endpoint_url": ...}}`).
    An http(s) URL is compared in its canonical form against the http(s) prefixes (themselves
    canonicalised) and fetched by `fetcher`, which bounds the fetch's time and the fetches at
    once; it is shared by every ImageSource given the same one.
    """

    allowed: tuple[str, ...] = ()
    root: str | None = None
    max_bytes: int = MAX_BYTES
    storage_options: dict | None = None
    fetcher: Fetcher = field(default_factory=Fetcher, compare=False)

    @cached_property
    def http_prefixes(self) -> tuple[HTTPURL, ...]:
        """The allowed http(s) prefixes, canonical; a prefix that is not a plain URL raises ValueError."""
        prefixes = tuple(parse_http_url(p) for p in self.allowed if _is_http(p))
        if any(p.query for p in prefixes):
            raise ValueError(f"an image URL prefix may not have a query: {list(self.allowed)}")
        return prefixes

    def allowed_url(self, path: str) -> HTTPURL:
        """An http(s) image URL's canonical form, if it lies under an allowed prefix (else ImageError)."""
        try:
            url = parse_http_url(path)
        except URLError as e:
            raise ImageError(f"image URL {path!r} refused: {e}") from None
        if not any(url.under(prefix) for prefix in self.http_prefixes):
            raise ImageError(f"image path {path!r} ({url}) is outside the allowed locations {list(self.allowed)}")
        return url

    def resolve(self, path) -> str:
        if path is None:
            raise ImageError("missing image path")
        if not isinstance(path, str):
            raise ImageError(f"image path must be a string, got {type(path).__name__}")
        if not path.strip():
            raise ImageError("empty image path")
        if _is_http(path):
            return str(self.allowed_url(path))
        if not _is_url(path) and not posixpath.isabs(path) and self.root is not None:
            path = posixpath.join(self.root, path)
        resolved = _normalize(path)
        for prefix in self.allowed:
            prefix = _normalize(prefix)
            if resolved == prefix or resolved.startswith(prefix.rstrip("/") + "/"):
                return resolved
        raise ImageError(f"image path {path!r} is outside the allowed locations {list(self.allowed)}")

    def read(self, path) -> bytes:
        """The bytes at an allowed path, at most `max_bytes` of them."""
        resolved = self.resolve(path)
        if _is_http(resolved):
            try:
                return self.fetcher.get(parse_http_url(resolved), self.max_bytes)
            except FetchError as e:
                raise ImageError(str(e)) from None
        import fsspec  # here, not at the top: command lines import this module before parsing their arguments

        protocol = resolved.split("://", 1)[0] if _is_url(resolved) else "file"
        options = (self.storage_options or {}).get(protocol, {})
        try:
            with self._open_local(resolved) if protocol == "file" else fsspec.open(resolved, "rb", **options) as f:
                data = f.read(self.max_bytes + 1)
        except FileNotFoundError as e:
            raise ImageError(f"missing image: {path}") from e
        except FileRefused as e:
            raise ImageError(f"image path refused: {e}") from e
        except Exception as e:
            raise ImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
        if len(data) > self.max_bytes:
            raise ImageError(f"image file {path} is over the limit of {self.max_bytes} bytes")
        return data

    def _open_local(self, resolved: str):
        """A local file, opened only if it is regular and under a local allowed folder once resolved."""
        folders = [p.removeprefix("file://") for p in self.allowed if not _is_url(p) or p.startswith("file://")]
        return open_regular(resolved.removeprefix("file://"), folders)

    def load(self, path, max_pixels: int = MAX_PIXELS) -> Image.Image:
        return decode_image(self.read(path), max_pixels)
