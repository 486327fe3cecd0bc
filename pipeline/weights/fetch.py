"""Downloading what `weights.lock` pins: parallel, resumable, retried, verified, atomic.

Every file is downloaded to ``<file>.part`` under the weights root (never outside it: lock paths
are checked by `pipeline.weights.lock.destination`). When a ``.part`` already exists the request
asks for the rest with an HTTP ``Range``; a ``206`` answer is appended, a ``200`` (the server
ignored the range) restarts the file. Connection errors, ``429`` and ``5xx`` answers are retried with
exponential backoff; other errors (``401``/``403`` for a gated file without a token, ``404``)
move on to the entry's next source, then fail that file. A finished ``.part`` is checked (size,
then sha256) and only then renamed over the destination, so a file under its real name is
always complete. Files already present and valid are not downloaded again. After all downloads,
every file is verified and every bad one reported in one `WeightsMissing`.

The Hugging Face token comes from the `token` argument, else ``$HF_TOKEN``, else the file named
by ``$HF_TOKEN_FILE`` (a BuildKit secret mount such as ``/run/secrets/hf_token``). It is sent as
``Authorization: Bearer`` only to the origin (scheme, host, port) of the URL written in the lock,
never to the hosts a redirect leads to (Hugging Face redirects downloads to its CDN), and never
over plain http except to loopback.

Imports `pipeline.weights.lock` (never the reverse) and `requests`; no torch.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests

from pipeline.errors import FetchError, LockFormatError, WeightsMissing
from pipeline.weights.lock import (
    COMMIT,
    HF_RESOLVE,
    Lock,
    LockFile,
    LockSource,
    WeightEntry,
    check_file,
    destination,
    load_lock,
    problems,
    raise_problems,
    save_lock,
)

log = logging.getLogger(__name__)

TOKEN_ENV = "HF_TOKEN"
TOKEN_FILE_ENV = "HF_TOKEN_FILE"
USER_AGENT = "character-faceswap-weights/0.1"
MAX_REDIRECTS = 10
_CHUNK = 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def resolve_token(token: str | None = None) -> str | None:
    """The token to use: the argument, else $HF_TOKEN, else the contents of $HF_TOKEN_FILE."""
    if token:
        return token.strip()
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip()
    path = os.environ.get(TOKEN_FILE_ENV)
    if path and os.path.isfile(path):
        text = Path(path).read_text(encoding="utf-8").strip()
        return text or None
    return None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _open(session: requests.Session, url: str, headers: dict[str, str], token: str | None,
          timeout: float) -> requests.Response:
    """GET `url` following redirects by hand, with the token only for the lock URL's origin."""
    home = _origin(url)
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        sent = dict(headers)
        scheme, host, _port = _origin(current)
        if token and _origin(current) == home and (scheme == "https" or _is_loopback(host)):
            sent["Authorization"] = f"Bearer {token}"
        resp = session.get(current, headers=sent, stream=True, timeout=timeout,
                           allow_redirects=False)
        if resp.status_code not in _REDIRECTS:
            return resp
        location = resp.headers.get("Location")
        resp.close()
        if not location:
            raise FetchError(f"{current} answered {resp.status_code} without a Location",
                             retry=False)
        nxt = urljoin(current, location)
        if urlsplit(nxt).scheme not in ("http", "https") or (
                scheme == "https" and urlsplit(nxt).scheme != "https"):
            raise FetchError(f"{current} redirects to {nxt!r}: refused (scheme)", retry=False)
        current = nxt
    raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects", retry=False)


def _download(session: requests.Session, url: str, part: Path, file: LockFile,
              token: str | None, timeout: float) -> None:
    """One attempt: resume or restart `part` from `url`; raises FetchError."""
    have = part.stat().st_size if part.exists() else 0
    if file.size is not None and have > file.size:
        part.unlink()
        have = 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = _open(session, url, headers, token, timeout)
    except requests.RequestException as exc:
        raise FetchError(f"{url}: {exc}", retry=True) from None
    with resp:
        status = resp.status_code
        if status == 416 and have and file.size == have:
            return  # the .part is already complete
        if status == 416:
            part.unlink(missing_ok=True)
            raise FetchError(f"{url}: range {have}- not satisfiable; restarting", retry=True)
        if status in (401, 403):
            raise FetchError(f"{url}: HTTP {status} (gated or private: set HF_TOKEN or "
                             "HF_TOKEN_FILE to a token that accepted the model's terms)",
                             retry=False)
        if status == 429 or status >= 500:
            raise FetchError(f"{url}: HTTP {status}", retry=True)
        if status not in (200, 206):
            raise FetchError(f"{url}: HTTP {status}", retry=False)
        mode = "ab"
        if status == 206:
            start = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if start != str(have):
                part.unlink(missing_ok=True)
                raise FetchError(f"{url}: asked for bytes {have}-, got "
                                 f"{resp.headers.get('Content-Range')!r}; restarting", retry=True)
        else:
            mode = "wb"  # 200: the server sent the whole file, start over
            if have:
                log.info("%s ignored the range request; restarting %s", url, part.name)
        try:
            with open(part, mode) as fh:
                fh.writelines(resp.iter_content(_CHUNK))
        except requests.RequestException as exc:
            raise FetchError(f"{url}: connection lost ({exc}); will resume", retry=True) from None


def _fetch_one(root: Path, entry: WeightEntry, file: LockFile, *, token: str | None,
               retries: int, backoff: float, timeout: float, allow_unpinned: bool) -> str | None:
    """Make one file present and valid; returns None, or a problem line for the final report."""
    label = f"{entry.target}/{file.path}"
    try:
        dest = destination(root, entry, file)
    except LockFormatError as exc:
        return f"unsafe path: {label} ({exc})"
    if dest.is_file() and check_file(dest, file, label, allow_unpinned=allow_unpinned) is None:
        log.info("present and valid: %s", label)
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with requests.Session() as session:  # one per file: sessions are not shared across threads
        return _fetch_into(session, dest, entry, file, label, token=token, retries=retries,
                           backoff=backoff, timeout=timeout)


def _fetch_into(session: requests.Session, dest: Path, entry: WeightEntry, file: LockFile,
                label: str, *, token: str | None, retries: int, backoff: float,
                timeout: float) -> str | None:
    part = dest.with_name(dest.name + ".part")
    errors: list[str] = []
    for source in entry.sources:
        url = entry.url(file, source)
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                log.info("downloading %s (attempt %d)", url, attempt + 1)
                _download(session, url, part, file, token, timeout)
            except FetchError as exc:
                errors.append(str(exc))
                log.warning("%s", exc)
                if exc.retry:
                    continue
                break
            problem = check_file(part, file, label, allow_unpinned=True)
            if problem is None:
                os.replace(part, dest)
                log.info("fetched and verified: %s", label)
                return None
            part.unlink(missing_ok=True)  # complete but wrong: never resume from it
            errors.append(f"{url}: {problem}")
            log.warning("%s: %s", url, problem)
    return f"download failed: {label} ({'; '.join(errors[-3:])})"


LOCK_STEP = ("run `python -m pipeline.weights lock` on a machine with network (HF_TOKEN set for "
             "gated files), review and commit the weights.lock diff, then fetch again")


def unpinned_records(lock: Lock) -> list[str]:
    """What keeps `lock` from a strict fetch: files without size/digest, sources at a branch."""
    found = [f"unpinned: {e.target}/{f.path}" for e, f in lock.items() if not f.pinned]
    return found + [f"revision not a commit: {e.name} ({s.uri})" for e in lock.weights
                    for s in e.sources if not s.revision_pinned]


def unpinned_message(records: list[str]) -> str:
    """One line (the CLI prints it, a failed Docker build ends with it): what is unpinned and
    the one way out."""
    return (f"{len(records)} record(s) of the lock are not pinned ({'; '.join(records)}): "
            f"{LOCK_STEP} (--allow-unpinned fetches without the check)")


def fetch(root: Path | str, lock: Lock, *, token: str | None = None, workers: int = 4,
          retries: int = 3, backoff: float = 1.0, timeout: float = 60.0,
          allow_unpinned: bool = False) -> None:
    """Download every file of `lock` under `root`, then verify all of them; raise WeightsMissing
    naming every file that failed."""
    root = Path(root)
    unpinned = unpinned_records(lock)
    if unpinned and not allow_unpinned:  # fail before downloading gigabytes for nothing
        raise WeightsMissing(unpinned_message(unpinned))
    root.mkdir(parents=True, exist_ok=True)
    token = resolve_token(token)
    if any(e.gated for e in lock.weights) and not token:
        log.warning("no Hugging Face token (HF_TOKEN / HF_TOKEN_FILE): gated files will fail")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = [pool.submit(_fetch_one, root, e, f, token=token, retries=retries,
                            backoff=backoff, timeout=timeout, allow_unpinned=allow_unpinned)
                for e, f in lock.items()]
        failed = [line for job in jobs if (line := job.result())]
    if failed:
        raise WeightsMissing(f"{len(failed)} model file(s) could not be fetched into {root}: "
                             + "; ".join(failed))
    # Each file was size- and digest-checked just before its rename (or found valid): the final
    # pass re-checks presence and sizes of all, without hashing 25 GB a second time.
    trusted = frozenset(destination(root, e, f) for e, f in lock.items())
    raise_problems(root, problems(root, lock, allow_unpinned=allow_unpinned, trusted=trusted))


def _measure(session: requests.Session, url: str, token: str | None,
             timeout: float) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    resp = _open(session, url, {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}, token,
                 timeout)
    with resp:
        if resp.status_code != 200:
            raise FetchError(f"{url}: HTTP {resp.status_code}", retry=resp.status_code >= 500)
        for chunk in resp.iter_content(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, "sha256:" + h.hexdigest()


def _pin_revision(session: requests.Session, source: LockSource, token: str | None,
                  timeout: float) -> LockSource:
    """`source` at the commit its branch or tag points to now (Hugging Face's
    `/api/models/<repo>/revision/<rev>` answers it as `sha`)."""
    if source.revision_pinned:
        return source
    match = HF_RESOLVE.fullmatch(source.uri.rstrip("/"))
    if match is None:  # a GitHub LFS URL at a branch: no revision API here, pin it by hand
        raise FetchError(f"{source.uri}: pin this source to a 40-hex commit by hand", retry=False)
    api = f"{match['origin']}/api/models/{match['repo']}/revision/{match['revision']}"
    resp = _open(session, api, {"User-Agent": USER_AGENT, "Accept": "application/json"}, token,
                 timeout)
    with resp:
        if resp.status_code != 200:
            raise FetchError(f"{api}: HTTP {resp.status_code}", retry=resp.status_code >= 500)
        sha = str(resp.json().get("sha", ""))
    if not COMMIT.fullmatch(sha):
        raise FetchError(f"{api}: no commit sha in the answer (got {sha!r})", retry=False)
    pinned = (f"{match['origin']}/{match['repo']}/resolve/{sha}{match['folder'] or ''}")
    log.info("pinned %s -> %s", source.uri, pinned)
    return LockSource(pinned)


def lock_fill(lock_path: Path | str, *, token: str | None = None, timeout: float = 60.0,
              profile: str | None = None) -> int:
    """Pin every source at a branch or tag (`main`) to its current commit, then fill every null
    size/digest of the lock by streaming the file through sha256 (nothing is written but the
    lock); a value already in the lock must match. `profile`: only that profile's entries (the
    others are kept as they are); None: all. Returns how many file records changed. Run it on a
    machine with network access, then review and commit the lock."""
    lock_path = Path(lock_path)
    lock = load_lock(lock_path)
    chosen = {e.name for e in (lock if profile is None else lock.for_profile(profile)).weights}
    token = resolve_token(token)
    changed, mismatches, entries = 0, [], []
    with requests.Session() as session:
        for entry in lock.weights:
            if entry.name not in chosen:
                entries.append(entry)
                continue
            entry = replace(entry, sources=[_pin_revision(session, s, token, timeout)
                                            for s in entry.sources])
            files = []
            for f in entry.files:
                if f.pinned:
                    files.append(f)
                    continue
                url = entry.url(f, entry.sources[0])
                log.info("measuring %s", url)
                size, digest = _measure(session, url, token, timeout)
                for what, known, got in (("size", f.size, size), ("digest", f.digest, digest)):
                    if known is not None and known != got:
                        mismatches.append(f"{what} mismatch: {entry.target}/{f.path} "
                                          f"(lock says {known}, {url} gives {got})")
                files.append(replace(f, size=size, digest=digest))
                changed += 1
            entries.append(replace(entry, files=files))
    if mismatches:
        raise WeightsMissing("; ".join(mismatches))
    save_lock(replace(lock, weights=entries), lock_path)
    return changed
