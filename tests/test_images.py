"""Safe image loading: every kind of bad image is an ImageError, the pixel limit is checked on the
header before decoding, and paths outside the allow-list are never read."""

import io
import struct
import zlib

import pytest
from PIL import Image

from conftest import http_image_server, special_files, within
from elastic_ray.data.images import ImageError, ImageSource, decode_image


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data is two bytes of nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x00\x00") + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_to_rgb(fmt):
    image = decode_image(encoded(Image.new("RGBA" if fmt == "PNG" else "RGB", (40, 30), (200, 10, 10)), fmt))
    assert image.mode == "RGB" and image.size == (40, 30)
    assert image.getpixel((5, 5))[0] > 150


@pytest.mark.parametrize("data, message", [
    (None, "missing image"),
    (b"", "empty image"),
    ("a string", "must be encoded bytes, got str"),
    (12, "must be encoded bytes, got int"),
    (b"not an image at all", "undecodable image: not one of"),
])
def test_bad_values(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_truncated_image():
    data = encoded(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ImageError, match="undecodable image .*truncated"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_is_checked_before_decoding():
    # The header claims 8000 x 8000 and there is no pixel data: decoding first would fail as
    # truncated, so the pixel-limit error shows the check ran on the header alone.
    with pytest.raises(ImageError, match="8000x8000 = 64000000 pixels, over the limit of 1000000"):
        decode_image(png_header_only(8000, 8000), max_pixels=1_000_000)
    with pytest.raises(ImageError, match="truncated|undecodable"):
        decode_image(png_header_only(100, 100), max_pixels=1_000_000)


def test_decompression_bomb_is_refused():
    bomb = encoded(Image.new("1", (20000, 20000)))  # 400 megapixels in about 50 KB
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="pixel limit"):
        decode_image(bomb)


def test_format_outside_the_allow_list_is_refused():
    data = encoded(Image.new("RGB", (8, 8)), "PPM")
    assert Image.open(io.BytesIO(data)).size == (8, 8)  # PIL itself would open it
    with pytest.raises(ImageError, match="undecodable"):
        decode_image(data)


def test_source_reads_only_allowed_paths(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encoded(Image.new("RGB", (9, 7))))
    (tmp_path / "secret.png").write_bytes(encoded(Image.new("RGB", (9, 7))))
    source = ImageSource(allowed=(str(images),), root=str(images))
    assert source.load("a.png").size == (9, 7)
    assert source.load(str(images / "a.png")).size == (9, 7)
    for path in ["../secret.png", str(tmp_path / "secret.png"), "http://127.0.0.1:9/a.png", "s3://bucket/a.png"]:
        with pytest.raises(ImageError, match="outside the allowed locations"):
            source.read(path)
    with pytest.raises(ImageError, match="missing image"):
        source.read("nope.png")
    for path, message in [(None, "missing image path"), ("  ", "empty image path"), (3, "must be a string")]:
        with pytest.raises(ImageError, match=message):
            source.read(path)


def test_extreme_aspect_ratios_are_refused():
    assert decode_image(encoded(Image.new("RGB", (100, 2)))).size == (100, 2)
    for size in [(101, 2), (1, 60)]:
        with pytest.raises(ImageError, match="aspect ratio is over 50"):
            decode_image(encoded(Image.new("RGB", size)))


def test_source_does_not_follow_http_redirects_out_of_the_allowed_prefix():
    paths, redirects = {"/allowed/a.png", "/private/a.png"}, {"/allowed/moved.png": "/private/a.png"}
    with http_image_server(encoded(Image.new("RGB", (9, 7))), paths, redirects) as url:
        source = ImageSource(allowed=(f"{url}/allowed/",))
        assert source.load(f"{url}/allowed/a.png").size == (9, 7)
        with pytest.raises(ImageError, match="redirects are not followed"):
            source.load(f"{url}/allowed/moved.png")
        assert decode_image(ImageSource(allowed=(url,)).read(f"{url}/private/a.png")).size == (9, 7)


def test_source_refuses_files_over_the_byte_limit(tmp_path):
    (tmp_path / "big.png").write_bytes(encoded(Image.effect_noise((64, 64), 50).convert("RGB")))
    with pytest.raises(ImageError, match="over the limit of 1000 bytes"):
        ImageSource(allowed=(str(tmp_path),), root=str(tmp_path), max_bytes=1000).read("big.png")


def test_source_reads_regular_files_only_resolving_symlinks(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(encoded(Image.new("RGB", (9, 7))))
    (folder / "link-in.png").symlink_to(folder / "a.png")
    (tmp_path / "secret.png").write_bytes(encoded(Image.new("RGB", (9, 7))))
    source = ImageSource(allowed=(str(folder),), root=str(folder))
    with special_files(folder, tmp_path / "secret.png") as refused:
        for name, message in refused.items():
            with pytest.raises(ImageError, match=message):
                within(10, source.read, name)
    assert source.load("link-in.png").size == (9, 7)  # a link that stays inside is followed
    (tmp_path / "via-link").symlink_to(folder)  # so is an allowed folder reached through a link
    assert ImageSource(allowed=(str(tmp_path / "via-link"),)).load(str(tmp_path / "via-link" / "a.png")).size == (9, 7)
    with pytest.raises(ImageError, match="/dev/zero is a character device, not a regular file"):
        within(10, ImageSource(allowed=("/dev",)).read, "/dev/zero")
