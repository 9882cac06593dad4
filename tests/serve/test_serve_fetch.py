"""Image URLs other than data: are safe by default: file: only under --allowed-local-media-path (no
escape, regular files only), http(s) only with --allow-http-images, with one deadline for the whole
fetch, the byte limit while reading, no redirect to another scheme, errors that name no file or port,
and a bound on fetches at once so hanging ones never starve data: requests. Test servers listen on
127.0.0.1 only and stop with the test."""

import contextlib
import json
import os
import socket
import threading
import time

import pytest
from serve_helpers import data_url, http, live_server, picture, user_message

from moevlm.serve.errors import ApiError
from moevlm.serve.fetch import Fetcher, FetchPolicy

PNG = None


def png_bytes() -> bytes:
    global PNG
    if PNG is None:
        import base64
        PNG = base64.b64decode(data_url(picture(2)).split(",", 1)[1])
    return PNG


def refused(call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


@contextlib.contextmanager
def tcp_server(handle):
    """A server on 127.0.0.1 that runs ``handle(connection, log)`` for every connection on its own
    thread; yields (port, log). Every connection is closed when the block ends."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.05)  # accept() wakes up to see the stop
    log, connections, stop = [], [], threading.Event()

    def serve_one(conn):
        with conn:
            try:
                handle(conn, log, stop)
            except OSError:
                log.append("closed")

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            connections.append(conn)
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], log
    finally:
        stop.set()
        listener.close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        thread.join(5)


def read_request(conn) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(4096)
        if not more:
            break
        data += more
    return data


def test_file_urls_are_refused_without_a_media_folder(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    err = refused(lambda: Fetcher(FetchPolicy(allow_http=True)).read((tmp_path / "a.png").as_uri(), 10**6))
    assert (err.status, err.param, err.code) == (400, "messages", "image_url_refused")
    assert "--allowed-local-media-path" in err.message


def test_file_urls_read_only_regular_files_inside_the_media_folder(tmp_path):
    media, outside = tmp_path / "media", tmp_path / "outside"
    media.mkdir()
    outside.mkdir()
    (media / "a.png").write_bytes(png_bytes())
    (outside / "secret.png").write_bytes(png_bytes())
    (media / "link.png").symlink_to(outside / "secret.png")
    (media / "sub").mkdir()
    os.mkfifo(media / "fifo.png")
    fetcher = Fetcher(FetchPolicy(local_media=media.resolve()))
    assert fetcher.read((media / "a.png").as_uri(), 10**6) == png_bytes()
    assert fetcher.read("file://localhost" + str(media / "sub" / ".." / "a.png"), 10**6) == png_bytes()
    for url in [f"file://{media}/../outside/secret.png", (media / "link.png").as_uri(), (media / "sub").as_uri(),
                (media / "none.png").as_uri(), (media / "fifo.png").as_uri(), "file:///proc/self/fd/0",
                "file:///dev/zero", f"file://otherhost{media}/a.png"]:
        result = []
        reader = threading.Thread(target=lambda: result.append(refused(lambda: fetcher.read(url, 10**6))), daemon=True)
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), f"{url}: the read hangs"
        err = result[0]
        assert (err.status, err.param, err.code) == (400, "messages", "image_unreadable"), url
        assert err.message == "image_url: no readable image file at that path under the server's media folder"
    err = refused(lambda: fetcher.read((media / "a.png").as_uri(), 10))
    assert (err.status, err.code) == (413, "image_too_large")


def test_http_urls_are_refused_unless_allowed():
    err = refused(lambda: Fetcher(FetchPolicy()).read("http://127.0.0.1:9/a.png", 10**6))
    assert (err.status, err.param, err.code) == (400, "messages", "image_url_refused")


def test_fetch_errors_name_no_port_or_reason(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fetcher = Fetcher(FetchPolicy(allow_http=True, timeout=2))

    def not_found(conn, log, stop):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    with tcp_server(not_found) as (missing_port, _):
        errors = [refused(lambda u=u: fetcher.read(u, 10**6)) for u in
                  (f"http://127.0.0.1:{port}/a.png", f"http://127.0.0.1:{missing_port}/a.png")]
    for err in errors:
        assert (err.status, err.param, err.code) == (400, "messages", "image_fetch_failed")
        assert err.message == "image_url: the image could not be fetched (within 2 s, answering 200)"


def test_a_dripping_server_is_cut_off_at_the_deadline():
    """The body (or the headers) come a byte every 20 ms for 10 s: a per-read timeout would wait for
    all of it; the one deadline of 0.5 s ends the fetch after a few dozen bytes."""
    def drip(headers_first: bool):
        def handle(conn, log, stop):
            read_request(conn)
            if headers_first:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n")
            for _ in range(500):
                if stop.is_set():
                    return
                conn.sendall(b"X")
                log.append(1)
                time.sleep(0.02)
        return handle

    fetcher = Fetcher(FetchPolicy(allow_http=True, timeout=0.5))
    for headers_first in (True, False):
        with tcp_server(drip(headers_first)) as (port, log):
            err = refused(lambda: fetcher.read(f"http://127.0.0.1:{port}/slow.png", 10**6))
            sent = len(log)
        assert (err.status, err.code) == (400, "image_fetch_failed")
        assert sent < 250, f"the fetch read {sent} of 500 dripped bytes"


def test_the_byte_limit_holds_while_reading_and_redirects_keep_their_scheme(tmp_path):
    def endless(conn, log, stop):
        request = read_request(conn)
        if b"GET /to-https" in request:
            conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: https://127.0.0.1:1/png\r\nContent-Length: 0\r\n\r\n")
            return
        if b"GET /to-png" in request:
            conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /png\r\nContent-Length: 0\r\n\r\n")
            return
        if b"GET /png" in request:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(png_bytes()) + png_bytes())
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")  # no length: the body runs until the connection closes
        for _ in range(1024):  # 64 MiB at most
            conn.sendall(b"X" * 65536)
        log.append("sent it all")

    fetcher = Fetcher(FetchPolicy(allow_http=True, timeout=5))
    with tcp_server(endless) as (port, log):
        err = refused(lambda: fetcher.read(f"http://127.0.0.1:{port}/big.png", 10_000))
        assert (err.status, err.param, err.code) == (413, "messages", "image_too_large")
        err = refused(lambda: fetcher.read(f"http://127.0.0.1:{port}/to-https", 10_000))
        assert (err.status, err.code) == (400, "image_fetch_failed") and "another scheme" in err.message
        assert fetcher.read(f"http://127.0.0.1:{port}/to-png", 10_000) == png_bytes()
    assert log == ["closed"]  # the reader hung up long before 64 MiB were sent


def test_hanging_fetches_never_starve_a_data_url_request(checkpoint):
    """40 requests whose image server never answers: 8 fetches hang (--max-image-fetches), the other 32
    get 429 at once, and a data: request is answered while the 8 still hang."""
    hanging = threading.Semaphore(0)

    def never_answers(conn, log, stop):
        read_request(conn)
        log.append("open")
        hanging.release()
        stop.wait(60)

    # The image server stops first: the hanging fetches then fail at once and the app stops quickly.
    with live_server(checkpoint, allow_http_images=True, image_fetch_timeout=60) as (url, _), \
            tcp_server(never_answers) as (port, log):
        request = {"model": checkpoint.name, "temperature": 0, "max_tokens": 4}
        statuses = []

        def fetch_one():
            statuses.append(http(f"{url}/v1/chat/completions", json.dumps(
                {**request, "messages": user_message(f"http://127.0.0.1:{port}/hang.png")}).encode(), timeout=120))

        clients = [threading.Thread(target=fetch_one, daemon=True) for _ in range(40)]
        for client in clients:
            client.start()
        for _ in range(8):
            assert hanging.acquire(timeout=30)
        deadline = time.monotonic() + 30
        while len(statuses) < 32 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, _, reply = http(f"{url}/v1/chat/completions", json.dumps(
            {**request, "messages": user_message(data_url(picture(1)))}).encode(), timeout=30)
        assert status == 200 and json.loads(reply)["choices"][0]["message"]["role"] == "assistant"
        assert log.count("open") == 8 and len(statuses) == 32  # the 8 still hang
        assert all(s == 429 and json.loads(body)["error"]["code"] == "too_many_fetches" for s, _, body in statuses)


def test_at_most_max_decodes_images_decode_and_prepare_at_once(monkeypatch):
    import moevlm.serve.images as images

    running, most, lock = [0], [0], threading.Lock()
    decode = images.open_image_bytes

    def counted(data):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        return decode(data)

    def prepare(image):
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return image.size

    monkeypatch.setattr(images, "open_image_bytes", counted)
    loader = images.ImageLoader(images.ImageLimits(max_decodes=2))
    sizes = []
    threads = [threading.Thread(target=lambda: sizes.append(loader.load(data_url(picture(1)), prepare)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sizes == [(24, 24)] * 8 and most[0] == 2


def test_serve_refuses_bad_fetch_and_image_flags_with_exit_code_2(checkpoint, tmp_path, capsys):
    from moevlm.cli import main

    assert main(["serve", "--model", str(checkpoint), "--allowed-local-media-path", str(tmp_path / "none")]) == 2
    assert f"--allowed-local-media-path {tmp_path / 'none'}: not a folder" in capsys.readouterr().err
    assert main(["serve", "--model", str(checkpoint), "--max-image-pixels", "200000000"]) == 2
    assert ("--max-image-pixels must be at most 178956970 (Pillow decodes no larger image), not 200000000"
            in capsys.readouterr().err)
    assert main(["serve", "--model", str(checkpoint), "--request-timeout", "0"]) == 2
    assert "--request-timeout must be > 0, not 0.0" in capsys.readouterr().err
    assert main(["serve", "--model", str(checkpoint), "--max-image-decodes", "0"]) == 2
    assert "--max-image-decodes must be >= 1, not 0" in capsys.readouterr().err
