"""Fetch the dataset archive from a URL or a local path, verify its md5, write it atomically."""

import contextlib
import hashlib
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from .atomic import atomic_path
from .errors import UserError

CHUNK = 1 << 20  # bytes per read


def fetch(url, dest, md5=None, timeout=60):
    """Copy `url` (http(s), file:// or a local path) to `dest`; refuse it if md5 differs."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        digest = hashlib.md5()
        with _open(url, timeout) as (source, size), tmp.open("wb") as out:
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := source.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if md5 is not None and digest.hexdigest() != md5:
            raise UserError(
                f"md5 of {url} is {digest.hexdigest()}, expected {md5}: the file is corrupt or "
                "another version; fix data.url, or set data.md5 to null to skip the check"
            )
    return dest


@contextlib.contextmanager
def _open(url, timeout):
    """Yield (readable file, size in bytes or None) for a URL or a local path."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp"):
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            raise UserError(
                f"cannot download {url} ({reason}); without a network, fetch the archive "
                "elsewhere and run: dvc exp run -S data.url=/path/to/archive.tar.gz"
            ) from None
        length = response.headers.get("Content-Length")
        with response:
            yield response, int(length) if length else None
        return
    path = Path(parsed.path if parsed.scheme == "file" else url)
    if not path.is_file():
        raise UserError(f"data.url = {url}: no such file")
    with path.open("rb") as file:
        yield file, path.stat().st_size
