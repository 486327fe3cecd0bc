"""`weights.lock`: every model file pinned by source, size and sha256 (the leaf of the package).

The lock speaks cog's own weights-lock shape (replicate/cog `pkg/weights/lockfile`):
``{"version": 1, "weights": [{"name", "target", "sources": [{"uri"}], "files": [{"path", "size",
"digest": "sha256:..."}]}]}``. ``target`` is a folder relative to the weights root (the same
folders as `pipeline.layout.Layout`); each file lands at ``<root>/<target>/<path>`` and is
downloaded from ``<source uri>/<path>`` (later sources are mirrors of the first). An entry may
also say ``"license"`` and ``"gated": true`` (needs a Hugging Face token at fetch time). A
``null`` size or digest means "not pinned yet": `python -m pipeline.weights lock` fills it in on
a machine with network. Every entry also says whether its licence allows commercial use behind
an API (``"commercial": true|false``) and which model profiles load it (``"profiles": ["seed",
"commercial"]``, names from `pipeline.profiles`); `Lock.for_profile` selects a profile's entries
and refuses a commercial profile that would ship a non-commercial file.

Here: the format (parse, load, save), the checks (`destination`, `sha256_file`, `problems`,
`verify`, `noncommercial_present`). Standard library only, importable without torch or `requests`; it imports nothing of
`pipeline.weights` (`fetch` and `__main__` import it, never the other way).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.errors import LockFormatError, WeightsMissing
from pipeline.layout import PROJECT_ROOT
from pipeline.profiles import COMMERCIAL, PROFILES

log = logging.getLogger(__name__)

LOCK_VERSION = 1
DEFAULT_LOCK = PROJECT_ROOT / "weights.lock"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Canonical order; `commercial` and `profiles` are required, the others optional.
_ENTRY_KEYS = ("name", "target", "license", "commercial", "profiles", "gated", "sources", "files")
# Profiles sold behind a paid API: every file they load must have `commercial: true`.
COMMERCIAL_PROFILES = frozenset({COMMERCIAL})
# `pipeline.convert` writes converted/<checkpoint>/manifest.json naming its source file (kept
# equal to pipeline.convert.CONVERTED_DIR / MANIFEST by tests/test_weights.py; no torch here).
CONVERTED_MANIFESTS = "converted/*/manifest.json"
_HASH_CHUNK = 8 * 1024 * 1024


# A Hugging Face file URL prefix: <origin>/<owner>/<repo>/resolve/<revision>[/<folder>].
HF_RESOLVE = re.compile(r"(?P<origin>https?://[^/]+)/(?P<repo>[^/]+/[^/]+)/resolve/"
                        r"(?P<revision>[^/]+)(?P<folder>/.*)?")
COMMIT = re.compile(r"[0-9a-f]{40}")
# A GitHub LFS file URL prefix: media.githubusercontent.com/media/<owner>/<repo>/<ref>[/<folder>].
GITHUB_MEDIA = re.compile(r"https://media\.githubusercontent\.com/media/(?P<repo>[^/]+/[^/]+)/"
                          r"(?P<revision>[^/]+)(?P<folder>/.*)?")


@dataclass(frozen=True)
class LockSource:
    """Where an entry's files come from: ``<uri>/<file path>``."""

    uri: str

    @property
    def revision_pinned(self) -> bool:
        """False for a Hugging Face or GitHub LFS URL at a branch or tag (`main`): its bytes can
        change under the same URL. Other URLs (mirrors, test servers) have no revision to pin."""
        uri = self.uri.rstrip("/")
        match = HF_RESOLVE.fullmatch(uri) or GITHUB_MEDIA.fullmatch(uri)
        return match is None or COMMIT.fullmatch(match["revision"]) is not None


@dataclass(frozen=True)
class LockFile:
    """One file of an entry, relative to the entry's target folder."""

    path: str
    size: int | None
    digest: str | None  # "sha256:<64 hex>"

    @property
    def pinned(self) -> bool:
        return self.size is not None and self.digest is not None


@dataclass(frozen=True)
class WeightEntry:
    """One model: a target folder under the weights root and the files that land in it."""

    name: str
    target: str
    sources: list[LockSource]
    files: list[LockFile]
    license: str | None = None
    gated: bool = False
    commercial: bool = False  # the licence allows commercial use behind an API
    profiles: tuple[str, ...] = ()  # the pipeline.profiles names that load this entry

    def url(self, file: LockFile, source: LockSource) -> str:
        return source.uri.rstrip("/") + "/" + file.path


@dataclass(frozen=True)
class Lock:
    """A parsed `weights.lock`."""

    weights: list[WeightEntry]
    version: int = LOCK_VERSION

    def items(self) -> list[tuple[WeightEntry, LockFile]]:
        return [(entry, f) for entry in self.weights for f in entry.files]

    def for_profile(self, name: str) -> Lock:
        """The entries profile `name` loads. A commercial profile that would take an entry
        marked `commercial: false` is refused: a lock bug must not ship a non-commercial file."""
        if name not in PROFILES:
            raise LockFormatError(f"unknown profile {name!r} (one of: {', '.join(PROFILES)})")
        chosen = [e for e in self.weights if name in e.profiles]
        barred = [e.name for e in chosen if not e.commercial]
        if name in COMMERCIAL_PROFILES and barred:
            raise LockFormatError(
                f"profile {name!r} lists entries whose licence does not allow commercial use "
                f"(commercial: false): {', '.join(barred)}; remove {name!r} from their "
                "`profiles` in the lock")
        return Lock(chosen, self.version)


# ---------------------------------------------------------------------------- format


def relative_path(value: object, key: str) -> PurePosixPath:
    """A lock path as a safe relative POSIX path: no absolute path, no `..`, no backslash."""
    if not isinstance(value, str) or not value:
        raise LockFormatError(f"`{key}` must be a non-empty string, got {value!r}")
    parts = value.split("/")
    if value.startswith("/") or "\\" in value or re.match(r"[A-Za-z]:", value) \
            or any(p in ("", ".", "..") for p in parts):
        raise LockFormatError(f"`{key}` must be a relative path inside the weights folder "
                              f"(no leading '/', '..', '.', '\\' or empty part), got {value!r}")
    return PurePosixPath(value)


def _parse_file(raw: object, key: str) -> LockFile:
    if not isinstance(raw, dict):
        raise LockFormatError(f"`{key}` must be an object, got {raw!r}")
    for k in raw:
        if k not in ("path", "size", "digest"):
            raise LockFormatError(f"`{key}.{k}` is not a key of a lock file entry")
    relative_path(raw.get("path"), f"{key}.path")
    size, digest = raw.get("size"), raw.get("digest")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise LockFormatError(f"`{key}.size` must be a byte count (integer >= 0) or null, "
                              f"got {size!r}")
    if digest is not None and (not isinstance(digest, str) or not _DIGEST.fullmatch(digest)):
        raise LockFormatError(f"`{key}.digest` must be 'sha256:' + 64 lowercase hex digits or "
                              f"null, got {digest!r}")
    return LockFile(raw["path"], size, digest)


def _parse_entry(raw: object, key: str) -> WeightEntry:
    if not isinstance(raw, dict):
        raise LockFormatError(f"`{key}` must be an object, got {raw!r}")
    for k in raw:
        if k not in _ENTRY_KEYS:
            raise LockFormatError(f"`{key}.{k}` is not a key of a weights entry "
                                  f"(allowed: {', '.join(_ENTRY_KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise LockFormatError(f"`{key}.name` must be a name like 'sam-vit-b', got {name!r}")
    relative_path(raw.get("target"), f"{key}.target")
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise LockFormatError(f"`{key}.sources` must be a non-empty list, got {sources!r}")
    parsed_sources = []
    for i, src in enumerate(sources):
        uri = src.get("uri") if isinstance(src, dict) else None
        if not isinstance(src, dict) or set(src) != {"uri"} \
                or not isinstance(uri, str) or not re.match(r"https?://[^/\s]+/?\S*$", uri):
            raise LockFormatError(f"`{key}.sources[{i}]` must be {{\"uri\": \"http(s)://...\"}}, "
                                  f"got {src!r}")
        parsed_sources.append(LockSource(uri))
    files = raw.get("files")
    if not isinstance(files, list) or not files:
        raise LockFormatError(f"`{key}.files` must be a non-empty list, got {files!r}")
    license_, gated = raw.get("license"), raw.get("gated", False)
    if license_ is not None and not isinstance(license_, str):
        raise LockFormatError(f"`{key}.license` must be a string, got {license_!r}")
    if not isinstance(gated, bool):
        raise LockFormatError(f"`{key}.gated` must be true or false, got {gated!r}")
    commercial = raw.get("commercial")
    if not isinstance(commercial, bool):
        raise LockFormatError(f"`{key}.commercial` must be true or false (does the licence allow "
                              f"commercial use behind an API?), got {commercial!r}")
    return WeightEntry(name, raw["target"], parsed_sources,
                       [_parse_file(f, f"{key}.files[{i}]") for i, f in enumerate(files)],
                       license_, gated, commercial, _parse_profiles(raw.get("profiles"), key))


def _parse_profiles(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise LockFormatError(f"`{key}.profiles` must be a non-empty list of profile names "
                              f"({', '.join(PROFILES)}), got {value!r}")
    for i, name in enumerate(value):
        if name not in PROFILES:
            raise LockFormatError(f"`{key}.profiles[{i}]` must be one of "
                                  f"{', '.join(PROFILES)}, got {name!r}")
        if name in value[:i]:
            raise LockFormatError(f"`{key}.profiles[{i}]` repeats {name!r}")
    return tuple(value)


def parse_lock(data: object, where: str = "weights.lock") -> Lock:
    """Validate a decoded lock document; errors name the bad key."""
    if not isinstance(data, dict):
        raise LockFormatError(f"{where}: the document must be a JSON object, got {type(data)}")
    for k in data:
        if k not in ("version", "weights"):
            raise LockFormatError(f"{where}: `{k}` is not a top-level key (version, weights)")
    if data.get("version") != LOCK_VERSION or isinstance(data.get("version"), bool):
        raise LockFormatError(f"{where}: `version` must be {LOCK_VERSION}, "
                              f"got {data.get('version')!r}")
    weights = data.get("weights")
    if not isinstance(weights, list):
        raise LockFormatError(f"{where}: `weights` must be a list, got {weights!r}")
    try:
        entries = [_parse_entry(e, f"weights[{i}]") for i, e in enumerate(weights)]
    except LockFormatError as exc:
        raise LockFormatError(f"{where}: {exc}") from None
    names, dests = set(), set()
    for i, entry in enumerate(entries):
        if entry.name in names:
            raise LockFormatError(f"{where}: `weights[{i}].name` {entry.name!r} is used twice")
        names.add(entry.name)
        for f in entry.files:
            dest = f"{entry.target}/{f.path}"
            if dest in dests:
                raise LockFormatError(f"{where}: `weights[{i}]` puts a second file at {dest!r}")
            dests.add(dest)
    return Lock(entries)


def load_lock(path: Path | str) -> Lock:
    """Read and validate a lock file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LockFormatError(f"lock file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise LockFormatError(f"{path}: not valid JSON ({exc})") from None
    return parse_lock(data, str(path))


def lock_to_dict(lock: Lock) -> dict:
    """The canonical JSON form: entries in order, each entry's files sorted by path."""
    out = []
    for e in lock.weights:
        d: dict = {"name": e.name, "target": e.target}
        if e.license is not None:
            d["license"] = e.license
        d["commercial"] = e.commercial
        d["profiles"] = list(e.profiles)
        if e.gated:
            d["gated"] = True
        d["sources"] = [{"uri": s.uri} for s in e.sources]
        d["files"] = [{"path": f.path, "size": f.size, "digest": f.digest}
                      for f in sorted(e.files, key=lambda f: f.path)]
        out.append(d)
    return {"version": lock.version, "weights": out}


def save_lock(lock: Lock, path: Path | str) -> None:
    """Write the lock atomically (temp file + rename) in canonical form."""
    path = Path(path)
    text = json.dumps(lock_to_dict(lock), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".weights-lock-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- checks


def destination(root: Path, entry: WeightEntry, file: LockFile) -> Path:
    """Where a lock file lands, refusing any path that would leave `root`."""
    rel = relative_path(entry.target, f"{entry.name}.target") / relative_path(
        file.path, f"{entry.name}.files.path")
    dest = Path(root) / rel
    base = Path(root).resolve()
    if not dest.resolve().is_relative_to(base):
        raise LockFormatError(f"`{entry.name}` file {rel} resolves outside {root} "
                              "(a symlink escapes the weights folder)")
    return dest


def sha256_file(path: Path) -> str:
    """'sha256:<hex>' of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_CHUNK):
            h.update(block)
    return "sha256:" + h.hexdigest()


def check_file(path: Path, file: LockFile, label: str, *, allow_unpinned: bool,
               hash_it: bool = True) -> str | None:
    """One file against its lock record: None when good, else one problem line."""
    line = _check_size(path, file, label, allow_unpinned=allow_unpinned)
    return line if line or not hash_it else _check_digest(path, file, label)


def _check_size(path: Path, file: LockFile, label: str, *, allow_unpinned: bool) -> str | None:
    if not path.is_file():
        return f"missing: {label}"
    if not file.pinned and not allow_unpinned:
        return (f"unpinned: {label} (the lock has no size and/or digest for it; "
                "run `python -m pipeline.weights lock`)")
    size = path.stat().st_size
    if file.size is not None and size != file.size:
        return f"size mismatch: {label} (expected {file.size} bytes, got {size})"
    return None


def _check_digest(path: Path, file: LockFile, label: str) -> str | None:
    if file.digest is None:
        return None
    digest = sha256_file(path)
    if digest != file.digest:
        return f"digest mismatch: {label} (expected {file.digest}, got {digest})"
    return None


def problems(root: Path, lock: Lock, *, allow_unpinned: bool = False,
             trusted: frozenset[Path] = frozenset()) -> list[str]:
    """Every bad file under `root`: all presence and size checks first (cheap), then sha256 of
    the files that passed them (files in `trusted`, just verified by `fetch`, are not re-hashed).
    """
    found: list[str] = []
    to_hash: list[tuple[Path, LockFile, str]] = []
    for entry, f in lock.items():
        label = f"{entry.target}/{f.path}"
        try:
            dest = destination(root, entry, f)
        except LockFormatError as exc:
            found.append(f"unsafe path: {label} ({exc})")
            continue
        line = _check_size(dest, f, label, allow_unpinned=allow_unpinned)
        if line:
            found.append(line)
        elif dest not in trusted:
            to_hash.append((dest, f, label))
    for dest, f, label in to_hash:
        line = _check_digest(dest, f, label)
        if line:
            found.append(line)
    return found


def raise_problems(root: Path, lines: list[str]) -> None:
    if lines:
        raise WeightsMissing(f"{len(lines)} model file(s) under {root} do not match the lock: "
                             + "; ".join(lines))


def noncommercial_present(root: Path | str, lock: Lock) -> list[str]:
    """What under `root` comes from an entry marked `commercial: false`: its files, and folders
    `pipeline.convert` made from them (found by each manifest's `source`). A commercial tree must
    hold none: `cog build` copies whatever weights/ contains."""
    root = Path(root)
    barred = {f"{e.target}/{f.path}": e.name for e, f in lock.items() if not e.commercial}
    found = [f"non-commercial file present: {rel} ({name}: commercial: false)"
             for rel, name in barred.items() if (root / rel).is_file()]
    for manifest in sorted(root.glob(CONVERTED_MANIFESTS)):
        try:
            source = json.loads(manifest.read_text(encoding="utf-8")).get("source")
        except (OSError, ValueError, AttributeError):
            source = None
        if source in barred:
            found.append(f"non-commercial conversion present: "
                         f"{manifest.parent.relative_to(root).as_posix()} (made from {source}, "
                         f"{barred[source]}: commercial: false)")
    return found


def verify(root: Path | str, lock: Lock, *, allow_unpinned: bool = False) -> None:
    """Check every file (missing, size, then sha256); raise WeightsMissing listing ALL bad ones."""
    root = Path(root)
    raise_problems(root, problems(root, lock, allow_unpinned=allow_unpinned))
    log.info("verified %d file(s) under %s", len(lock.items()), root)
