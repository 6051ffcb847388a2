"""data: URLs carry an image's bytes; anything else, bad base64 and oversized payloads are ImageErrors."""

import base64

import pytest

from elastic_ray.data.images import ImageError, data_url_bytes


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize("media_type", ["image/png", "image/jpeg", ""])
def test_returns_the_decoded_bytes(media_type):
    assert data_url_bytes(data_url(b"\x89PNG any bytes", media_type)) == b"\x89PNG any bytes"


@pytest.mark.parametrize("url, message", [
    ("data:text/plain;base64,YWJj", "not an image"),
    ("data:image/png,abc", "must look like"),
    ("https://example.com/a.png", "must look like"),
    ("data:image/png;base64,YW Jj", "not valid base64"),
    ("data:image/png;base64,YWJ", "not valid base64"),
    ("data:image/png;base64,é", "not valid base64"),
])
def test_refuses_what_is_not_a_base64_image(url, message):
    with pytest.raises(ImageError, match=message):
        data_url_bytes(url)


def test_size_limit_applies_to_the_payload_and_the_bytes():
    assert data_url_bytes(data_url(b"x" * 12), max_bytes=12) == b"x" * 12
    with pytest.raises(ImageError, match="over the limit of 11 bytes"):
        data_url_bytes(data_url(b"x" * 12), max_bytes=11)
    with pytest.raises(ImageError, match="over the limit of 12 bytes"):
        data_url_bytes("data:image/png;base64," + "A" * 10**6, max_bytes=12)
