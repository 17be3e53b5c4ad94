"""Raw dataset files: the offline mirror first, the upstream URLs second.

Each raw source is one archive in the shared data mirror (``../shared/data``): a tar archive, or
a single compressed file (``.xz``, ``.gz``, ``.bz2``), decompressed into a directory of its own.
The archive is a byte copy of files in a public repository at a fixed commit, so without a mirror
the same layout is rebuilt by downloading every member from that commit and checking its sha256.

:func:`fetch` returns a directory holding the extracted layout. It is placed atomically (built
in a temporary directory beside the target, then renamed), so a killed fetch never leaves a
half-extracted directory that a later call would trust.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rex.config.errors import DataError

MIRROR_ENV = "REX_DATA_MIRROR"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_CHUNK = 1 << 20
_TAR_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar")
_DECOMPRESSORS: dict[str, Callable[..., IO[Any]]] = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


@dataclass(frozen=True)
class Member:
    """One file of a raw source: where it lies in the extracted layout and where it comes from."""

    path: str
    url: str
    sha256: str


@dataclass(frozen=True)
class RawSource:
    """A mirror archive and the upstream files it is a byte copy of."""

    archive: str
    sha256: str
    members: list[Member] = field(default_factory=list)

    @property
    def single_file(self) -> str | None:
        """For a single compressed file (not a tar): its name once decompressed, else None."""
        if self.archive.endswith(_TAR_SUFFIXES):
            return None
        for suffix in _DECOMPRESSORS:
            if self.archive.endswith(suffix):
                return self.archive[: -len(suffix)]
        return None

    @property
    def stem(self) -> str:
        """The extracted directory's name: the archive name without its compression suffixes
        (and, for a single compressed file, without its own extension: ``x.tsv.xz`` -> ``x``)."""
        name = self.archive
        for suffix in _TAR_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
        single = self.single_file
        return Path(single).stem if single is not None else name


def members(folder: str, base_url: str, sha256s: dict[str, str]) -> list[Member]:
    """Members ``<folder>/<name>`` of a source, downloaded from ``<base_url>/<name>``."""
    return [Member(f"{folder}/{name}", f"{base_url}/{name}", sha256) for name, sha256 in sha256s.items()]


_RECBOLE = "https://github.com/RUCAIBox/RecBole/raw/7b02be5e/recbole/dataset_example/ml-100k"
_S3REC = "https://github.com/RUCAIBox/CIKM2020-S3Rec/raw/2a81540a/data"

ML100K_RECBOLE = RawSource(
    archive="ml-100k_recbole.tar.xz",
    sha256="218c642aee145a4ae1ee0334db9188b81308a91d0a3f6c0bbfbe43c887a6e6d5",
    members=[
        Member(
            "ml-100k/ml-100k.inter",
            f"{_RECBOLE}/ml-100k.inter",
            "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
        ),
        Member(
            "ml-100k/ml-100k.item",
            f"{_RECBOLE}/ml-100k.item",
            "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
        ),
        Member(
            "ml-100k/ml-100k.user",
            f"{_RECBOLE}/ml-100k.user",
            "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
        ),
    ],
)

AMAZON_S3REC_SEQ = RawSource(
    archive="amazon_s3rec_seq.tar.xz",
    sha256="bd72123373c8d6655e844dbef46e3a94f1c9c7b2147d06548e877476d546d8e5",
    members=[
        Member(
            "s3rec/Beauty.txt",
            f"{_S3REC}/Beauty.txt",
            "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
        ),
        Member(
            "s3rec/Beauty_item2attributes.json",
            f"{_S3REC}/Beauty_item2attributes.json",
            "129e40f67486f6877eff0f5318cfa8530ee8ac23d8b0d1de04e1bb7a2ba0b2d4",
        ),
        Member(
            "s3rec/Sports_and_Outdoors.txt",
            f"{_S3REC}/Sports_and_Outdoors.txt",
            "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2",
        ),
        Member(
            "s3rec/Sports_and_Outdoors_item2attributes.json",
            f"{_S3REC}/Sports_and_Outdoors_item2attributes.json",
            "7fb10733ac4f1811384a52144cdefa7fcc7536fa80a7232c5da9bd789155c34b",
        ),
    ],
)

SOURCES: dict[str, RawSource] = {s.archive: s for s in (ML100K_RECBOLE, AMAZON_S3REC_SEQ)}


def _mirror_candidates() -> list[Path]:
    """Where a mirror is looked for, in order (the env variable, when set, is the only place)."""
    env = os.environ.get(MIRROR_ENV)
    if env:
        return [Path(env).expanduser()]
    return [Path.cwd().parent / "shared" / "data", _REPO_ROOT.parent / "shared" / "data"]


def mirror_dir() -> Path | None:
    """The data mirror directory, or None when there is none.

    ``REX_DATA_MIRROR`` wins when set; if it names a missing directory there is no mirror (it is
    not silently replaced by the default). Otherwise the first existing of ``../shared/data``
    beside the working directory and beside the repository.
    """
    for candidate in _mirror_candidates():
        if candidate.is_dir():
            return candidate
    return None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(source: RawSource, cache_dir: Path) -> Path:
    """Return ``cache_dir/<archive stem>`` holding the source's extracted layout.

    A directory already in place is reused: it only ever appears there complete and verified.
    With a mirror the archive's sha256 is checked and it is extracted; without one (or when the
    mirror lacks the archive) every member is downloaded and checked.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / source.stem
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    mirror = mirror_dir()
    archive = mirror / source.archive if mirror is not None else None
    if archive is not None and archive.is_file():
        log(f"extracting {archive}")
        _verify_archive(archive, source.sha256)
        _place(target, lambda tmp: _extract(archive, tmp, source.single_file))
    else:
        where = (
            f"no data mirror at {_mirror_candidates()[0]} (set {MIRROR_ENV})"
            if mirror is None
            else f"{source.archive} is not in the data mirror {mirror}"
        )
        _place(target, lambda tmp: _download_members(source, tmp, where))
    return target


def _verify_archive(archive: Path, expected: str) -> None:
    got = sha256_file(archive)
    if got != expected:
        raise DataError(
            f"sha256 mismatch (expected {expected}, got {got}); the mirror file is damaged or "
            "not the published one: re-copy the mirror file",
            file=str(archive),
        )


def _extract(archive: Path, dest: Path, single_file: str | None = None) -> None:
    """Extract a tar archive into ``dest``, or decompress a single file to ``dest/single_file``."""
    try:
        if single_file is not None:
            opener = _DECOMPRESSORS[archive.suffix]
            with opener(archive, "rb") as source, open(dest / single_file, "wb") as out:
                shutil.copyfileobj(source, out, _CHUNK)
            return
        with tarfile.open(archive, "r:*") as tar:
            # The "data" filter refuses absolute paths, links out of dest and device files.
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, lzma.LZMAError, OSError, EOFError) as exc:
        raise DataError(f"cannot extract: {exc}; re-copy the mirror file", file=str(archive)) from exc


def _download_members(source: RawSource, dest: Path, where: str) -> None:
    if not source.members:
        raise DataError(
            f"{where}, and {source.archive} has no upstream files to download (it is derived from "
            "them): put it in the data mirror"
        )
    for member in source.members:
        out = dest / member.path
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"downloading {member.url}")
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(member.url, timeout=60) as response, open(out, "wb") as handle:
                while chunk := response.read(_CHUNK):
                    digest.update(chunk)
                    handle.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DataError(f"{where} and download of {member.url} failed: {reason}") from exc
        got = digest.hexdigest()
        if got != member.sha256:
            raise DataError(
                f"download of {member.url} has sha256 {got}, expected {member.sha256}; the upstream "
                f"file changed or the download was damaged: put {source.archive} in the data mirror"
            )


def _place(target: Path, build: Callable[[Path], None]) -> None:
    """Build a directory in a temporary sibling with ``build(tmp)``, then rename it to ``target``.

    On any failure the temporary directory is removed, so nothing partial is left behind.
    """
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process placed the same verified layout first; theirs is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def log(message: str) -> None:
    """Print a progress line for a long data step (stderr, so stdout stays clean)."""
    print(f"[rex data] {message}", file=sys.stderr, flush=True)
