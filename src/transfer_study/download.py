"""Fetch a dataset's files from URLs or local paths, verify their md5s, write them atomically."""

import contextlib
import hashlib
import http.client
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from transfer_study.core import paths
from transfer_study.core.atomic import atomic_path, write_json
from transfer_study.core.catalog import DATASETS
from transfer_study.core.progress import progress
from transfer_study.core.stage import UserError

CHUNK = 1 << 20  # bytes per read
ATTEMPTS = 4  # tries per file on transient network errors
BACKOFF = 2.0  # seconds before the first retry; doubles each time (2, 4, 8 s)
TIMEOUT = 60  # seconds without a byte before a connection counts as failed
REMOTE_SCHEMES = ("http", "https", "ftp")  # what is downloaded; anything else is a local copy


class _TransientError(Exception):
    """A network failure worth retrying: refused or dropped connection, timeout, HTTP 5xx."""


def download_dataset(data, folder):
    """Fetch the files of data.dataset into `folder` and record where they came from.

    data.url "official" takes the dataset's own source; otherwise, for a one-file dataset it is
    that file's URL or path, for several files the URL or folder that holds them by name.
    data.md5 "official" checks the published md5s, null skips the check, and a digest checks a
    one-file dataset's mirror.
    """
    source = DATASETS[data.dataset]
    record = {"dataset": data.dataset, "files": {}}
    for name, official_md5 in source.files.items():
        if data.url == "official":
            url = source.base_url + name
        elif len(source.files) == 1:
            url = data.url
        else:
            url = data.url.rstrip("/") + "/" + name
        md5 = official_md5 if data.md5 == "official" else data.md5
        fetch(url, Path(folder) / name, md5)
        record["files"][name] = {"url": url, "md5": md5}
    if data.dataset == "folder":
        record["path"] = str(data.path)
    write_json(Path(folder) / "source.json", record)
    return record


def fetch(url, dest, md5=None, timeout=TIMEOUT, attempts=ATTEMPTS, backoff=BACKOFF):
    """Copy `url` (http(s), file:// or a local path) to `dest`; refuse it if md5 differs.

    Transient network errors are retried `attempts` times in all, waiting `backoff` seconds,
    then twice as long each time; a server silent for `timeout` seconds counts as one.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _fetch_once(url, Path(dest), md5, timeout)
        except _TransientError as error:
            if attempt == attempts:
                raise UserError(
                    f"cannot download {url} ({error}, {attempts} tries); without a network, fetch "
                    "the archive elsewhere and run: dvc exp run -S data.url=/path/to/archive.tar.gz"
                ) from None
            wait = backoff * 2 ** (attempt - 1)
            print(f"download {url}: {error}; retrying in {wait:g} s", file=sys.stderr)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _fetch_once(url, dest, md5, timeout):
    with atomic_path(dest) as tmp:
        digest = hashlib.md5()
        with _open(url, timeout) as (source, size), tmp.open("wb") as out:
            verb = "download" if urlparse(url).scheme in REMOTE_SCHEMES else "copy"
            with progress(size, f"{verb} {dest.name}", unit="B", unit_scale=True) as bar:
                while chunk := _read(source):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if md5 is not None and digest.hexdigest() != md5:
            raise UserError(
                f"md5 of {url} is {digest.hexdigest()}, expected {md5}: the file is corrupt or "
                "another version; fix data.url, or set data.md5 to null to skip the check"
            )
    return dest


def _read(source):
    try:
        return source.read(CHUNK)
    except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
        raise _TransientError(f"transfer broke off: {error}") from None


@contextlib.contextmanager
def _open(url, timeout):
    """Yield (readable file, size in bytes or None) for a URL or a local path."""
    parsed = urlparse(url)
    if parsed.scheme in REMOTE_SCHEMES:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as error:
            if error.code < 500:  # 404 and the like: asking again will not help
                message = f"cannot download {url}: HTTP {error.code} {error.reason}"
                raise UserError(message) from None
            raise _TransientError(f"HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise _TransientError(str(getattr(error, "reason", error))) from None
        length = response.headers.get("Content-Length")
        with response:
            yield response, int(length) if length else None
        return
    path = Path(parsed.path) if parsed.scheme == "file" else paths.user_path(url)
    if not path.is_file():  # a FIFO or a device would block the read, or never end it
        what = "not a regular file" if path.exists() else "no such file"
        raise UserError(f"data.url = {url}: {what} ({path})")
    with path.open("rb") as file:
        yield file, path.stat().st_size
