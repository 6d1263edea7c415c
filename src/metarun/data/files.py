"""Known dataset files, and the checks that run before anything in them is unpickled or unpacked.

A pickle is a program: unpickling a file runs whatever it says. An archive can write anywhere its
member names point. So every image loader that reads a pickle or an archive first calls
:func:`verify` (directly, or through :func:`download`), which compares the file's size and
checksum with the published values in a :class:`KnownFile`, and only then opens it.
learn2learn's mini-ImageNet downloader shows why: when Google Drive answers with an HTML page
("quota exceeded", "confirm download"), it unpickles that page. Here such a page has the wrong size
and the wrong SHA-256, so it is deleted and reported.

Where no published checksum is known, the registry entry has ``sha256=None`` and ``md5=None``.
Such a file is then neither downloaded nor opened, unless the user vouches for it by giving its
SHA-256 through ``dataset.checksums`` (see :func:`read_checksums`): a mapping ``{file name: sha256}``
or the path of a ``sha256sum``-style file. Image folders, CSV and text files are never checked:
decoding them runs no code.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import tempfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from metarun.errors import DatasetError, one_line

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HOW_TO_VOUCH = "set dataset.checksums={{{name}: <sha256>}} (or the path of a sha256sum file) to use it"


@dataclass(frozen=True)
class KnownFile:
    """One dataset file and what it must look like.

    Attributes:
        name: file name, e.g. ``"cifar-100-python.tar.gz"``.
        size: size in bytes, checked first because it is free; ``None`` if unknown.
        sha256: lower-case hex SHA-256; ``None`` if no published value is known.
        md5: lower-case hex MD5, for files whose only published checksum is an MD5 (torchvision's).
        urls: where :func:`download` fetches it from, tried in order.
    """

    name: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    urls: tuple[str, ...] = ()

    @property
    def has_checksum(self) -> bool:
        return self.sha256 is not None or self.md5 is not None

    def expected(self) -> str:
        """The expected values, for messages: ``size 123 bytes, sha256 ab...``."""
        parts = [f"size {self.size} bytes"] if self.size is not None else []
        parts += [f"sha256 {self.sha256}"] if self.sha256 else []
        parts += [f"md5 {self.md5}"] if self.md5 else []
        return ", ".join(parts)


def read_checksums(checksums: Mapping[str, str] | str | os.PathLike | None) -> dict[str, str]:
    """``dataset.checksums`` as ``{file name: sha256}``.

    Args:
        checksums: ``None``; a mapping (Hydra hands over a DictConfig) from file name to SHA-256; or
            the path of a file in ``sha256sum`` format (``<sha256>  <file name>`` per line).

    Raises:
        DatasetError: the file is missing or a value is not a SHA-256.
    """
    if checksums is None:
        return {}
    if isinstance(checksums, str | os.PathLike):
        path = Path(checksums).expanduser()
        if not path.is_file():
            raise DatasetError(f"dataset.checksums file {path} not found; give a sha256sum file or a mapping")
        pairs = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                digest, _, name = line.strip().partition(" ")
                pairs[Path(name.strip().lstrip("*")).name] = digest
    else:
        pairs = {str(k): str(v) for k, v in checksums.items()}
    for name, digest in pairs.items():
        if not _SHA256.match(digest.lower()):
            raise DatasetError(f"dataset.checksums gives {digest!r} for {name}, which is not a 64-digit hex SHA-256")
    return {name: digest.lower() for name, digest in pairs.items()}


def with_checksums(known: KnownFile, checksums: Mapping[str, str]) -> KnownFile:
    """``known`` with the user's SHA-256 for its name, if any (it replaces the published values)."""
    if known.name not in checksums:
        return known
    return replace(known, size=None, sha256=checksums[known.name], md5=None)


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of ``path`` read in 1 MiB chunks (``algorithm``: ``"sha256"`` or ``"md5"``)."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, known: KnownFile) -> None:
    """Check ``path`` against ``known``: existence, then size (cheap), then SHA-256 and MD5.

    Raises:
        DatasetError: one line naming the file, what was expected and what to do.
    """
    fix = "delete it and re-download (dataset.download=true), or point dataset.root at a good copy"
    if not path.is_file():
        raise DatasetError(
            f"{path} not found ({known.name}, expected {known.expected() or 'no known checksum'}); "
            "point dataset.root at the folder that holds it, or set dataset.download=true"
        )
    if not known.has_checksum:
        raise DatasetError(
            f"no checksum is known for {path}, so it is not opened (it may hold code); "
            + _HOW_TO_VOUCH.format(name=known.name)
        )
    size = path.stat().st_size
    if known.size is not None and size != known.size:
        raise DatasetError(f"{path} has {size} bytes but {known.name} has {known.expected()}; {fix}")
    for algorithm in ("sha256", "md5"):
        expected = getattr(known, algorithm)
        if expected is not None and (actual := file_digest(path, algorithm)) != expected:
            raise DatasetError(f"{path} has {algorithm} {actual} but {known.name} has {known.expected()}; {fix}")


def download(known: KnownFile, dest: Path) -> Path:
    """Fetch ``known`` to ``dest`` and verify it; ``dest`` appears only if it matches.

    The bytes go to a temporary file in ``dest``'s folder, are verified there (so an HTML error
    page or a cut transfer is caught) and only then renamed to ``dest`` atomically. A file that
    fails is deleted and the next URL is tried.

    Raises:
        DatasetError: no checksum is known, or no URL gave a matching file.
    """
    if not known.has_checksum:
        raise DatasetError(
            f"no checksum is known for {known.name}, so it is not downloaded; download it by hand "
            f"({', '.join(known.urls) or 'no known URL'}) and check it, then " + _HOW_TO_VOUCH.format(name=known.name)
        )
    if not known.urls:
        raise DatasetError(f"no download URL is known for {known.name}; put it in {dest.parent} by hand")
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in known.urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            logger.info("downloading %s to %s", url, dest)
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
            verify(tmp, known)
            os.replace(tmp, dest)
            return dest
        except (OSError, http.client.HTTPException, DatasetError) as error:
            failures.append(f"{url}: {one_line(error)}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DatasetError(
        f"could not download {known.name} ({'; '.join(failures)}); nothing was kept; put a good copy "
        f"({known.expected()}) in {dest.parent} by hand"
    )


def fetch_missing(path: Path, known: KnownFile, fetch: bool) -> None:
    """Download ``known`` to ``path`` if it is missing and ``fetch`` is set (verified by :func:`download`).

    A file already there is left alone here: it is verified right before it is opened, so a run
    whose decoded images are cached never reads it.
    """
    if fetch and not path.is_file():
        download(known, path)
