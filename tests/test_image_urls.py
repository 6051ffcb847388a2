"""http(s) image URLs: the allow-list compares the canonical form, and the one request sent is for
exactly that form, so no encoding of an escape reaches a path outside the allowed prefix; each
fetch has one deadline, a byte limit and a bounded number of companions."""

import itertools
import posixpath
import random
import socket
import threading
import time
import unicodedata
from urllib.parse import unquote

import pytest
from PIL import Image

from conftest import http_image_server
from elastic_ray.data.fetch import Fetcher
from elastic_ray.data.images import ImageError, ImageSource
from elastic_ray.data.urls import URLError, parse_http_url
from test_images import encoded

PNG = encoded(Image.new("RGB", (9, 7)))
SERVED = {"/allowed/scene.png", "/allowed/sub/scene.png", "/secret.png", "/allowedx/scene.png", "/other/scene.png"}


@pytest.mark.parametrize("url, canonical", [
    ("HTTP://Example.COM/a/b.png", "http://example.com/a/b.png"),
    ("http://example.com:80/a", "http://example.com/a"),
    ("https://example.com:443/a", "https://example.com/a"),
    ("http://example.com:0080/a", "http://example.com/a"),
    ("http://example.com:/a", "http://example.com/a"),
    ("http://example.com:8080/a", "http://example.com:8080/a"),
    ("http://example.com./a", "http://example.com/a"),
    ("http://example.com", "http://example.com/"),
    ("http://example.com/a/./b/../c.png", "http://example.com/a/c.png"),
    ("http://example.com/a//b///c.png", "http://example.com/a/b/c.png"),
    ("http://example.com/a/%2e%2E/c.png", "http://example.com/c.png"),
    ("http://example.com/a/.%2e/c.png", "http://example.com/c.png"),
    ("http://example.com/../../c.png", "http://example.com/c.png"),
    ("http://example.com/a/b/..", "http://example.com/a/"),
    ("http://example.com/%61%2d%7e.png", "http://example.com/a-~.png"),
    ("http://example.com/a%2cb%20c.png", "http://example.com/a%2Cb%20c.png"),
    ("http://example.com/caf\u00e9.png", "http://example.com/caf%C3%A9.png"),
    ("http://example.com/a.png#/../secret", "http://example.com/a.png"),
    ("http://example.com/a.png?size=%2f1&x=\u00e9", "http://example.com/a.png?size=%2F1&x=%C3%A9"),
    ("http://B\u00dcCHER.example/a", "http://xn--bcher-kva.example/a"),
    ("http://\uff45xample\uff0ecom/a", "http://example.com/a"),
    ("http://[::FFFF:7F00:1]:8000/a", "http://[::ffff:7f00:1]:8000/a"),
])
def test_urls_take_one_canonical_form(url, canonical):
    assert str(parse_http_url(url)) == canonical
    assert parse_http_url(canonical) == parse_http_url(url)  # the canonical form is a fixed point


@pytest.mark.parametrize("url, message", [
    ("ftp://example.com/a", "not an http"),
    ("http:/example.com/a", "not an http"),
    ("//example.com/a", "not an http"),
    ("http://user:pw@example.com/a", "user information"),
    ("http://example.com@evil.com/a", "user information"),
    ("http://example.com\\@evil.com/a", "backslashes"),
    ("http://example.com/a\\..\\b", "backslashes"),
    ("http://example.com/a b", "spaces"),
    ("http://example.com/a\t/b", "control"),
    (" http://example.com/a", "spaces"),
    ("http://exa%6dple.com/a", "percent-encoded"),
    ("http://example.com/a/%2e%2e%2fsecret", "encoded slash"),
    ("http://example.com/a/%5c..", "encoded slash or backslash"),
    ("http://example.com/a/%252e%252e/secret", "double encoding"),
    ("http://example.com/a/%25/b", "double encoding"),
    ("http://example.com/a/%00.png", "control"),
    ("http://example.com/a/%zz", "not an escape"),
    ("http://example.com/a/..;/secret", "may be read as '..'"),
    ("http://example.com/a/.../secret", "may be read as '..'"),
    ("http://example.com/a/%2e%2e%20/secret", "may be read as '..'"),
    ("http://example.com/a/\uff0e\uff0e/secret", "may be read as '..'"),
    ("http://example.com/a/%ef%bc%8f/secret", "encoded slash"),
    ("http://2130706433/a", "dotted-quad"),
    ("http://127.1/a", "dotted-quad"),
    ("http://0x7f.0.0.1/a", "dotted-quad"),
    ("http://exa_mple..com/a", "bad host"),
    ("http://example.com:99999/a", "bad port"),
    ("http://example.com:8o/a", "bad port"),
    ("http:///a", "no host"),
])
def test_ambiguous_or_foreign_urls_are_refused(url, message):
    with pytest.raises(URLError, match=message):
        parse_http_url(url)


# --- Escapes against a real server -----------------------------------------------------------

# Each list starts with the forms a server reads as the plain character, then the ones refused as ambiguous.
DOTS = [".", "%2e", "%2E", "%252e", "%25%32%65", "\uff0e", "%ef%bc%8e", "%EF%BC%8E"]
SLASHES = ["/", "//", "/./", "/%2e/", "%2f", "%2F", "%252f", "\\", "%5c", "%5C", "\uff0f", "%ef%bc%8f", ";/", "/;x/"]
SUFFIXES = ["", "#x", "#/../../secret.png", "?q=1", "?/../secret.png", ";", "%00", "%20"]
PLAIN = {"dots": 3, "slashes": 4, "suffixes": 5, "hosts": 3}


def hosts(port: int) -> list[str]:
    return [f"127.0.0.1:{port}", f"127.0.0.1.:{port}", f"127.0.0.1:{port:05d}", f"user@127.0.0.1:{port}",
            f"127.0.0.1:{port}@127.0.0.1:{port}", f"127.1:{port}", f"2130706433:{port}", f"0x7f.0.0.1:{port}",
            f"[::ffff:127.0.0.1]:{port}", f"LOCALHOST:{port}", f"127.0.0.1:{port}\\@x"]


def escape_urls(port: int, count: int) -> list[str]:
    """Every dot and slash encoding climbing out of /allowed/, then `count` random mixtures of
    schemes, hosts, dots, slashes, depths and suffixes, each part plain more often than not."""
    urls = [f"http://127.0.0.1:{port}/allowed{s}{d}{d}{s}secret.png" for d, s in itertools.product(DOTS, SLASHES)]
    rng = random.Random(14)

    def pick(name, choices):
        return rng.choice(choices[: PLAIN[name]] if rng.random() < 0.7 else choices)

    for _ in range(count):
        slash = pick("slashes", SLASHES)
        climb = "".join(f"{slash}{pick('dots', DOTS)}{pick('dots', DOTS)}" for _ in range(rng.randint(1, 3)))
        middle = rng.choice(["", "/sub", "/a/b/c", "/a/b/c/d", f"{slash}{pick('dots', DOTS)}", "x"])
        urls.append(f"{rng.choice(['http', 'HTTP', 'hTtP'])}://{pick('hosts', hosts(port))}/allowed{middle}{climb}"
                    f"{slash}{rng.choice(['secret.png', 'other/scene.png', 'allowedx/scene.png', 'scene.png'])}"
                    f"{pick('suffixes', SUFFIXES)}")
    return urls


def readings(raw: str) -> set[str]:
    """The paths a server might make of a request target: as sent, percent-decoded once or twice,
    Unicode-compatibility-folded, backslashes as slashes, `;` parameters dropped; all with dot
    segments resolved."""
    path = raw.split("?", 1)[0]
    forms = {path, unquote(path), unquote(unquote(path))}
    forms |= {unicodedata.normalize("NFKC", f) for f in forms}
    forms |= {f.replace("\\", "/") for f in forms}
    forms |= {"/".join(s.split(";", 1)[0] for s in f.split("/")) for f in forms}
    return {posixpath.normpath("/" + f.lstrip("/")) for f in forms}


def test_no_encoding_of_an_escape_reaches_a_path_outside_the_prefix():
    log = []
    with http_image_server(PNG, SERVED, log=log) as base:
        port = int(base.rsplit(":", 1)[1])
        source = ImageSource(allowed=(f"{base}/allowed/",))
        urls, checked = escape_urls(port, 3000), 0
        for url in urls:
            sent = len(log)
            try:
                target = parse_http_url(source.resolve(url)).target
            except ImageError:
                assert len(log) == sent  # refused before any request
                continue
            checked += 1
            try:
                source.read(url)
            except ImageError as e:
                assert "missing image" in str(e)
            assert log[sent:] == [("GET", target)], url  # one request, for exactly the checked URL
    assert len(urls) > 3000 and checked > 100  # many variants stay inside the prefix and are fetched
    for _, raw in log:
        outside = [r for r in readings(raw) if not r.startswith("/allowed/")]
        assert not outside, (raw, outside)


def test_an_allowed_url_is_fetched_by_one_get_of_exactly_its_canonical_form():
    log = []
    with http_image_server(PNG, SERVED, log=log) as base:
        port = int(base.rsplit(":", 1)[1])
        source = ImageSource(allowed=(f"HTTP://127.0.0.1:{port}/allowed",))
        for variant in (f"{base}/allowed/scene.png", f"{base}/allowed/./scene.png", f"{base}//allowed//scene.png",
                        f"{base}/allowed/sub/../scene.png", f"HTTP://127.0.0.1:{port:06d}/allowed/%73cene.png#x",
                        f"{base}/allowed/sub/%2e%2E/scene.png", f"{base}/allowed/scene.png?v=1"):
            log.clear()
            assert source.read(variant) == PNG
            assert log == [("GET", parse_http_url(variant).target)], variant
            assert parse_http_url(variant).target.startswith("/allowed/scene.png")
        for outside in (f"{base}/allowedx/scene.png", f"{base}/allowed/../secret.png", f"{base}/allowed.png",
                        f"http://localhost:{port}/allowed/scene.png", f"https://127.0.0.1:{port}/allowed/scene.png"):
            with pytest.raises(ImageError, match="outside the allowed locations"):
                source.read(outside)
        assert log == [("GET", "/allowed/scene.png?v=1")]


# --- The fetch: one deadline, a byte limit, a bounded number at once --------------------------


def test_a_slow_server_is_cut_off_at_the_deadline():
    with http_image_server(PNG, SERVED, delay_s=30) as base:
        source = ImageSource(allowed=(f"{base}/allowed/",), fetcher=Fetcher(timeout_s=1.0))
        start = time.monotonic()
        with pytest.raises(ImageError, match="took over the deadline of 1.0 s"):
            source.read(f"{base}/allowed/scene.png")
        assert time.monotonic() - start < 10  # the server would answer after 30 s


@pytest.fixture
def raw_server():
    """A raw HTTP server on 127.0.0.1 whose answer the test writes: yields a function that takes
    `answer(conn)` (called on each connection after the request is read) and returns the base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(answer):
        def handle(conn):
            with conn:
                conn.recv(65536)
                try:
                    answer(conn, stop)
                except OSError:
                    pass

        def accept():
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=handle, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield serve
    stop.set()
    listener.close()


def test_a_server_that_drips_its_answer_is_cut_off_at_the_deadline(raw_server):
    def drip(conn, stop):  # one header byte every 0.2 s for a minute: each read succeeds, the whole never ends
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not stop.wait(0.2):
            conn.sendall(b"a")

    base = raw_server(drip)
    source = ImageSource(allowed=(f"{base}/",), fetcher=Fetcher(timeout_s=1.0))
    start = time.monotonic()
    with pytest.raises(ImageError, match="took over the deadline"):
        source.read(f"{base}/a.png")
    assert time.monotonic() - start < 10  # per-read timeouts alone would wait as long as the server drips


def test_the_byte_limit_holds_with_and_without_a_declared_length(raw_server):
    big = encoded(Image.effect_noise((64, 64), 50).convert("RGB"))
    with http_image_server(big, SERVED) as base:
        with pytest.raises(ImageError, match=f"is {len(big)} bytes, over the limit of 1000"):
            ImageSource(allowed=(f"{base}/allowed/",), max_bytes=1000).read(f"{base}/allowed/scene.png")

    def endless(conn, stop):  # no Content-Length: the body ends when the connection does, here never
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + big)
        while not stop.is_set():
            conn.sendall(b"\0" * 65536)

    base = raw_server(endless)
    with pytest.raises(ImageError, match="over the limit of 100000 bytes"):
        ImageSource(allowed=(f"{base}/",), max_bytes=100_000).read(f"{base}/a.png")
    assert len(big) < 100_000


def test_fetches_at_once_are_bounded_and_waiting_counts_against_the_deadline():
    in_flight, most = [0], [0]
    lock = threading.Lock()

    class Counting(list):
        """The server's log, appended as a request arrives; each request then takes 0.5 s."""

        def append(self, item):
            with lock:
                in_flight[0] += 1
                most[0] = max(most[0], in_flight[0])
            super().append(item)
            time.sleep(0.5)
            with lock:
                in_flight[0] -= 1

    with http_image_server(PNG, SERVED, log=Counting()) as base:
        source = ImageSource(allowed=(f"{base}/allowed/",), fetcher=Fetcher(timeout_s=30, max_concurrent=2))
        results = []
        threads = [threading.Thread(target=lambda: results.append(source.read(f"{base}/allowed/scene.png")))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [PNG] * 6 and most[0] == 2
    fetcher = Fetcher(timeout_s=0.5, max_concurrent=1)
    fetcher._slots.acquire()  # a fetch in progress that never ends
    with pytest.raises(ImageError, match="1 image fetches were in progress for 0.5 s"):
        ImageSource(allowed=("http://127.0.0.1:9/",), fetcher=fetcher).read("http://127.0.0.1:9/a.png")
