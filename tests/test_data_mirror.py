"""Raw sources: finding the mirror, verifying and extracting archives, downloading with checksums."""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rex.config.errors import DataError
from rex.data import mirror
from rex.data.mirror import (
    AMAZON_S3REC_SEQ,
    ML100K_RECBOLE,
    Member,
    RawSource,
    fetch,
    mirror_dir,
    sha256_file,
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FILES = {"toy/a.txt": b"1 2 3\n", "toy/sub/b.json": b'{"1": [2]}'}


def _upstream(tmp_path: Path) -> dict[str, Path]:
    """Write the toy member files where file:// URLs can reach them."""
    paths = {}
    for rel, data in FILES.items():
        path = tmp_path / "upstream" / rel.replace("/", "_")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths[rel] = path
    return paths


def _source(tmp_path: Path, *, corrupt: str | None = None) -> RawSource:
    paths = _upstream(tmp_path)
    members = [
        Member(rel, paths[rel].as_uri(), _sha(b"other bytes") if rel == corrupt else _sha(data))
        for rel, data in FILES.items()
    ]
    return RawSource(archive="toy.tar.xz", sha256="0" * 64, members=members)


@pytest.fixture
def no_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    missing = tmp_path / "no-such-mirror"
    monkeypatch.setenv("REX_DATA_MIRROR", str(missing))
    return missing


def test_mirror_dir_follows_the_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REX_DATA_MIRROR", str(tmp_path))
    assert mirror_dir() == tmp_path
    monkeypatch.setenv("REX_DATA_MIRROR", str(tmp_path / "missing"))
    assert mirror_dir() is None


def test_download_with_good_checksums(tmp_path: Path, no_mirror: Path) -> None:
    cache = tmp_path / "cache"
    out = fetch(_source(tmp_path), cache)
    assert out == cache / "toy"
    for rel, data in FILES.items():
        assert (out / rel).read_bytes() == data
    assert sorted(p.name for p in cache.iterdir()) == ["toy"]


def test_download_with_bad_checksum_leaves_nothing(tmp_path: Path, no_mirror: Path) -> None:
    cache = tmp_path / "cache"
    source = _source(tmp_path, corrupt="toy/sub/b.json")
    bad = source.members[1]
    with pytest.raises(DataError) as info:
        fetch(source, cache)
    message = str(info.value)
    assert bad.url in message and bad.sha256 in message and _sha(FILES["toy/sub/b.json"]) in message
    assert list(cache.iterdir()) == []


def test_no_mirror_and_failed_download(tmp_path: Path, no_mirror: Path) -> None:
    source = RawSource(
        "toy.tar.xz", "0" * 64, [Member("toy/a.txt", (tmp_path / "gone.txt").as_uri(), "0" * 64)]
    )
    with pytest.raises(
        DataError,
        match=r"no data mirror at .*no-such-mirror \(set REX_DATA_MIRROR\) and "
        r"download of file://.*gone.txt failed",
    ):
        fetch(source, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_no_mirror_and_offline(tmp_path: Path, no_mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(
        DataError,
        match=r"download of https://github.com/RUCAIBox/RecBole/raw/7b02be5e/"
        r"recbole/dataset_example/ml-100k/ml-100k.inter failed: network unreachable",
    ):
        fetch(ML100K_RECBOLE, tmp_path / "cache")


def _toy_archive(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for rel, data in FILES.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "toy.tar.xz").write_bytes(data)
    return data


def test_mirror_archive_is_verified_extracted_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _toy_archive(tmp_path / "mirror")
    monkeypatch.setenv("REX_DATA_MIRROR", str(tmp_path / "mirror"))
    source = RawSource("toy.tar.xz", _sha(archive), [])
    cache = tmp_path / "cache"
    out = fetch(source, cache)
    assert (out / "toy/sub/b.json").read_bytes() == FILES["toy/sub/b.json"]
    assert sorted(p.name for p in cache.iterdir()) == ["toy"]

    def must_not_extract(*args: object) -> None:
        raise AssertionError("extracted twice")

    monkeypatch.setattr(mirror, "_extract", must_not_extract)
    assert fetch(source, cache) == out


def test_mirror_archive_with_wrong_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _toy_archive(tmp_path / "mirror")
    monkeypatch.setenv("REX_DATA_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(DataError, match=r"mirror/toy.tar.xz: sha256 mismatch.*re-copy the mirror file"):
        fetch(RawSource("toy.tar.xz", "f" * 64, []), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("source", [ML100K_RECBOLE, AMAZON_S3REC_SEQ], ids=lambda s: s.archive)
def test_real_archives_match_their_member_checksums(source: RawSource, tmp_path: Path) -> None:
    if mirror_dir() is None or not (mirror_dir() / source.archive).is_file():
        pytest.skip("no data mirror with this archive")
    out = fetch(source, tmp_path)
    extracted = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert extracted == sorted(m.path for m in source.members)
    for member in source.members:
        assert sha256_file(out / member.path) == member.sha256, member.path
