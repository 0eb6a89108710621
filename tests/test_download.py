"""Downloads: local paths, file:// and http URLs, md5 checks, and one line when offline."""

import functools
import hashlib
import http.server
import socket
import threading
import time

import pytest

from transfer_study.core.stage import UserError
from transfer_study.download import fetch

PAYLOAD = b"cifar" * 100_000


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "mirror" / "cifar.tar.gz"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


@pytest.fixture
def http_url(source):
    """A server on the loopback interface only, serving the mirror folder."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=source.parent)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{source.name}"
    server.shutdown()


MD5 = hashlib.md5(PAYLOAD).hexdigest()


@pytest.mark.parametrize("kind", ["path", "file_url", "http"])
def test_fetch_copies_and_verifies(kind, source, tmp_path, request):
    url = {"path": str(source), "file_url": source.as_uri()}.get(kind) or request.getfixturevalue(
        "http_url"
    )
    dest = fetch(url, tmp_path / "data" / "archive.tar.gz", md5=MD5)
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in dest.parent.iterdir()] == ["archive.tar.gz"]


@pytest.mark.parametrize("kind", ["path", "http"])
def test_progress_says_copy_for_a_local_file_and_download_for_a_url(
    kind, source, tmp_path, request, monkeypatch, capsys
):
    monkeypatch.setenv("TRANSFER_STUDY_PROGRESS", "lines")  # a log's lines, as under DVC
    url = str(source) if kind == "path" else request.getfixturevalue("http_url")
    fetch(url, tmp_path / "archive.tar.gz", md5=MD5)
    printed = capsys.readouterr().err
    verb, other = ("copy", "download") if kind == "path" else ("download", "copy")
    assert f"{verb} archive.tar.gz" in printed and f"{other} archive" not in printed


def test_wrong_md5_leaves_nothing(source, tmp_path):
    with pytest.raises(UserError, match=f"md5 of .* is {MD5}, expected 0123"):
        fetch(str(source), tmp_path / "data" / "archive.tar.gz", md5="0123")
    assert list((tmp_path / "data").iterdir()) == []


def test_null_md5_skips_the_check(source, tmp_path):
    assert fetch(str(source), tmp_path / "a.tar.gz", md5=None).read_bytes() == PAYLOAD


def test_offline_says_how_to_provide_the_archive(tmp_path):
    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UserError) as error:
        fetch(f"http://127.0.0.1:{port}/cifar.tar.gz", tmp_path / "a.tar.gz", timeout=5, backoff=0)
    assert "cannot download" in str(error.value)
    assert "dvc exp run -S data.url=/path/to/archive.tar.gz" in str(error.value)
    assert not (tmp_path / "a.tar.gz").exists()


def test_missing_local_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        fetch(str(tmp_path / "nope.tar.gz"), tmp_path / "a.tar.gz")


class Flaky(http.server.BaseHTTPRequestHandler):
    """Fails the first `failures` requests with 503, then serves PAYLOAD; or, with `stall`,
    never answers within the client's timeout."""

    failures, stall, requests = 2, 0.0, []

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.stall:
            time.sleep(self.stall)
        if len(self.requests) <= self.failures:
            self.send_error(503, "busy")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server():
    Flaky.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cifar.tar.gz"
    server.shutdown()


def test_transient_errors_are_retried_with_backoff(flaky_server, tmp_path, monkeypatch, capsys):
    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    dest = fetch(flaky_server, tmp_path / "a.tar.gz", md5=MD5, backoff=2.0)
    assert dest.read_bytes() == PAYLOAD
    assert len(Flaky.requests) == 3 and waits == [2.0, 4.0]  # doubling back-off
    assert "HTTP 503 busy; retrying in 2 s" in capsys.readouterr().err


def test_retries_give_up_with_the_offline_advice(flaky_server, tmp_path, monkeypatch):
    monkeypatch.setattr(Flaky, "failures", 99)
    with pytest.raises(UserError, match=r"HTTP 503 busy, 3 tries\); without a network"):
        fetch(flaky_server, tmp_path / "a.tar.gz", attempts=3, backoff=0)
    assert len(Flaky.requests) == 3 and not (tmp_path / "a.tar.gz").exists()


def test_a_silent_server_times_out_instead_of_hanging(flaky_server, tmp_path, monkeypatch):
    monkeypatch.setattr(Flaky, "stall", 3.0)
    started = time.monotonic()
    with pytest.raises(UserError, match="timed out, 2 tries"):
        fetch(flaky_server, tmp_path / "a.tar.gz", timeout=0.3, attempts=2, backoff=0)
    assert time.monotonic() - started < 2.5


def test_not_found_is_not_retried(http_url, tmp_path):
    with pytest.raises(UserError, match="HTTP 404"):
        fetch(http_url.replace("cifar.tar.gz", "nope.tar.gz"), tmp_path / "a.tar.gz", backoff=60)


def test_a_relative_path_means_the_same_in_a_queued_experiments_copy(source, tmp_path, monkeypatch):
    # `dvc exp run --queue` runs in <project>/.dvc/tmp/exps/<tmp>/; ../mirror is beside <project>.
    copy = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpq1w2e3"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    fetch("../mirror/cifar.tar.gz", copy / "got.tar.gz", MD5)
    assert (copy / "got.tar.gz").read_bytes() == PAYLOAD
    monkeypatch.chdir(tmp_path / "project")  # the workspace itself: the same path, the same file
    fetch("../mirror/cifar.tar.gz", tmp_path / "project" / "got.tar.gz", MD5)
    with pytest.raises(UserError, match=r"data.url = \.\./nothing.tar.gz: no such file \(/"):
        fetch("../nothing.tar.gz", copy / "none.tar.gz")
