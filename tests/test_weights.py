"""`weights.lock` and `pipeline.weights` (lock, fetch, __main__): format, verify, fetch (against
real HTTP servers on loopback: ranges, retries, redirects, tokens), lock filling, trees, the CLI,
and the repo's lock itself (every SPEC model, every Layout path, pinned Hugging Face sources)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.errors import LockFormatError, WeightsMissing
from pipeline.layout import PROJECT_ROOT, Layout
from pipeline.weights import fetch as weights_fetch
from pipeline.weights.__main__ import main
from pipeline.weights.lock import (
    DEFAULT_LOCK,
    load_lock,
    parse_lock,
    save_lock,
    verify,
)
from twins.lock import lock_from_tree

# ---------------------------------------------------------------- a file server on loopback


class FileServer:
    """`files` (url path -> bytes) on 127.0.0.1 with Range support; records each request's path
    and headers. `fail[path] = n`: 500 to the next n requests; `redirect[path] = url`: 302;
    `ignore_range`: 200 to range requests."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.fail: dict[str, int] = {}
        self.redirect: dict[str, str] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.sent: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, dict(self.headers)))
                if server.fail.get(self.path, 0) > 0:
                    server.fail[self.path] -= 1
                    self.send_error(500)
                    return
                if self.path in server.redirect:
                    self.send_response(302)
                    self.send_header("Location", server.redirect[self.path])
                    self.end_headers()
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                rng = self.headers.get("Range")
                start = 0
                if rng and not server.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])
                server.sent[self.path] = server.sent.get(self.path, 0) + len(body) - start

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def hits(self, path: str) -> list[dict[str, str]]:
        return [h for p, h in self.requests if p == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_FILE", raising=False)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


FILES = {
    "alpha/model.bin": bytes(range(256)) * 40,  # 10 KB
    "alpha/sub/config.json": b'{"hidden_size": 8}\n',
    "beta/weights.pt": b"\x00\x01beta weights" * 500,
}


# The keys every entry must carry (weights.lock `commercial` and `profiles`).
PROFILE_KEYS = {"commercial": True, "profiles": ["seed", "commercial"]}


def make_lock(server: FileServer, files: dict[str, bytes] = FILES, *, pin: bool = True) -> dict:
    """A lock whose entries `alpha` and `beta` point at `server` under /repo/<entry>/."""
    entries: dict[str, list] = {}
    for rel, data in files.items():
        entry, path = rel.split("/", 1)
        server.files[f"/repo/{entry}/{path}"] = data
        entries.setdefault(entry, []).append(
            {"path": path, "size": len(data) if pin else None,
             "digest": digest(data) if pin else None})
    return {"version": 1, "weights": [
        {"name": name, "target": f"models/{name}", **PROFILE_KEYS,
         "sources": [{"uri": f"{server.url}/repo/{name}"}], "files": files_}
        for name, files_ in entries.items()]}


def fetch(root: Path, lock, **kw):
    kw.setdefault("backoff", 0.0)
    kw.setdefault("timeout", 10.0)
    weights_fetch.fetch(root, lock, **kw)


# ---------------------------------------------------------------- fetch and verify


def test_fetch_downloads_every_file_and_verifies(server, tmp_path):
    lock = parse_lock(make_lock(server))
    fetch(tmp_path, lock, workers=3)
    for rel, data in FILES.items():
        entry, path = rel.split("/", 1)
        assert (tmp_path / "models" / entry / path).read_bytes() == data
    assert not list(tmp_path.rglob("*.part"))
    verify(tmp_path, lock)


def test_fetch_skips_valid_files_and_replaces_a_corrupted_one(server, tmp_path):
    lock = parse_lock(make_lock(server))
    fetch(tmp_path, lock)
    first = len(server.requests)
    fetch(tmp_path, lock)
    assert len(server.requests) == first, "valid files must not be downloaded again"
    target = tmp_path / "models/alpha/model.bin"
    target.write_bytes(b"\xff" + FILES["alpha/model.bin"][1:])
    fetch(tmp_path, lock)
    assert target.read_bytes() == FILES["alpha/model.bin"]
    assert len(server.requests) == first + 1


def test_verify_reports_every_bad_file_in_one_error(server, tmp_path):
    lock = parse_lock(make_lock(server))
    fetch(tmp_path, lock)
    corrupt = tmp_path / "models/alpha/model.bin"
    data = bytearray(corrupt.read_bytes())
    data[5000] ^= 0xFF  # same size, one byte wrong
    corrupt.write_bytes(bytes(data))
    (tmp_path / "models/beta/weights.pt").write_bytes(b"short")
    (tmp_path / "models/alpha/sub/config.json").unlink()
    with pytest.raises(WeightsMissing) as err:
        verify(tmp_path, lock)
    msg = str(err.value)
    assert "3 model file(s)" in msg
    assert "digest mismatch: models/alpha/model.bin" in msg
    assert f"size mismatch: models/beta/weights.pt (expected {len(FILES['beta/weights.pt'])} " \
           "bytes, got 5)" in msg
    assert "missing: models/alpha/sub/config.json" in msg


def test_unpinned_files_fail_verify_unless_allowed(server, tmp_path):
    lock = parse_lock(make_lock(server, pin=False))
    fetch(tmp_path, lock, allow_unpinned=True)
    with pytest.raises(WeightsMissing, match=r"unpinned: models/alpha/model\.bin"):
        verify(tmp_path, lock)
    verify(tmp_path, lock, allow_unpinned=True)
    before = len(server.requests)
    with pytest.raises(WeightsMissing, match=r"3 record\(s\) of the lock are not pinned"):
        fetch(tmp_path / "strict", lock)
    assert len(server.requests) == before, "a strict fetch of an unpinned lock downloads nothing"


@pytest.mark.parametrize("ignore_range", [False, True])
def test_resume_partial_download_with_range(server, tmp_path, ignore_range):
    """A .part is resumed with Range (206 appended); a server ignoring it (200) restarts."""
    lock = parse_lock(make_lock(server))
    server.ignore_range = ignore_range
    data = FILES["alpha/model.bin"]
    dest = tmp_path / "models/alpha/model.bin"
    dest.parent.mkdir(parents=True)
    (dest.parent / "model.bin.part").write_bytes(data[:4000])
    fetch(tmp_path, lock)
    assert dest.read_bytes() == data
    assert [h.get("Range") for h in server.hits("/repo/alpha/model.bin")] == ["bytes=4000-"]
    assert server.sent["/repo/alpha/model.bin"] == len(data) - (0 if ignore_range else 4000)


def test_retry_after_server_error(server, tmp_path):
    lock = parse_lock(make_lock(server))
    server.fail["/repo/beta/weights.pt"] = 2
    fetch(tmp_path, lock, retries=3)
    assert (tmp_path / "models/beta/weights.pt").read_bytes() == FILES["beta/weights.pt"]
    assert len(server.hits("/repo/beta/weights.pt")) == 3


def test_fetch_failures_are_all_reported_in_one_error(server, tmp_path):
    lock = parse_lock(make_lock(server))
    server.files["/repo/alpha/model.bin"] = b"\x00" * len(FILES["alpha/model.bin"])  # wrong bytes
    del server.files["/repo/beta/weights.pt"]  # 404
    server.fail["/repo/alpha/sub/config.json"] = 10  # 500 forever
    with pytest.raises(WeightsMissing) as err:
        fetch(tmp_path, lock, retries=1)
    msg = str(err.value)
    assert "3 model file(s) could not be fetched" in msg
    assert "models/alpha/model.bin" in msg and "digest mismatch" in msg
    assert "models/beta/weights.pt" in msg and "HTTP 404" in msg
    assert "models/alpha/sub/config.json" in msg and "HTTP 500" in msg
    assert not (tmp_path / "models/alpha/model.bin").exists()
    assert not list(tmp_path.rglob("*.part")), "a complete but wrong download is not kept"


def test_token_is_sent_only_to_the_lock_urls_own_host(server, tmp_path, monkeypatch):
    cdn = FileServer()
    try:
        data = FILES["beta/weights.pt"]
        raw = make_lock(server)
        cdn.files["/blob/beta"] = data
        server.redirect["/repo/beta/weights.pt"] = f"{cdn.url}/blob/beta"
        token_file = tmp_path / "hf_token"
        token_file.write_text("s3cret\n")
        monkeypatch.setenv("HF_TOKEN_FILE", str(token_file))
        fetch(tmp_path / "w", parse_lock(raw))
        assert (tmp_path / "w/models/beta/weights.pt").read_bytes() == data
        lock_host = server.hits("/repo/beta/weights.pt")
        assert lock_host and all(h.get("Authorization") == "Bearer s3cret" for h in lock_host)
        assert cdn.hits("/blob/beta"), "the redirect was followed"
        assert all("Authorization" not in h for h in cdn.hits("/blob/beta"))
    finally:
        cdn.close()


def test_token_resolution(tmp_path, monkeypatch):
    assert weights_fetch.resolve_token() is None
    monkeypatch.setenv("HF_TOKEN_FILE", str(tmp_path / "absent"))
    assert weights_fetch.resolve_token() is None  # secret not mounted: no token, no crash
    (tmp_path / "tok").write_text("  from-file \n")
    monkeypatch.setenv("HF_TOKEN_FILE", str(tmp_path / "tok"))
    assert weights_fetch.resolve_token() == "from-file"
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert weights_fetch.resolve_token() == "from-env"
    assert weights_fetch.resolve_token("explicit") == "explicit"


# ---------------------------------------------------------------- the format


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("path", "../escape.bin", "`weights[0].files[0].path` must be a relative path"),
    ("path", "/etc/passwd", "`weights[0].files[0].path` must be a relative path"),
    ("path", "a/../../b", "`weights[0].files[0].path`"),
    ("target", "../outside", "`weights[0].target` must be a relative path"),
    ("target", "C:/models", "`weights[0].target`"),
    ("digest", "md5:abc", "`weights[0].files[0].digest` must be 'sha256:'"),
    ("size", -1, "`weights[0].files[0].size` must be a byte count"),
    ("size", True, "`weights[0].files[0].size`"),
    ("extra", 1, "`weights[0].extra` is not a key"),
    ("sources", [{"uri": "ftp://x/y"}], "`weights[0].sources[0]`"),
])
def test_lock_errors_name_the_bad_key(key, value, needle):
    raw = {"version": 1, "weights": [{"name": "m", "target": "m", **PROFILE_KEYS, "sources": [
        {"uri": "https://huggingface.co/o/r/resolve/" + "a" * 40}],
        "files": [{"path": "f.bin", "size": 1, "digest": None}]}]}
    if key in ("path", "digest", "size"):
        raw["weights"][0]["files"][0][key] = value
    else:
        raw["weights"][0][key] = value
    with pytest.raises(LockFormatError) as err:
        parse_lock(raw)
    assert needle in str(err.value)


def test_lock_rejects_bad_version_duplicates_and_unknown_top_keys():
    with pytest.raises(LockFormatError, match="`version` must be 1"):
        parse_lock({"version": "1", "weights": []})
    with pytest.raises(LockFormatError, match="`files` is not a top-level key"):
        parse_lock({"version": 1, "weights": [], "files": []})
    entry = {"name": "m", "target": "t", **PROFILE_KEYS, "sources": [{"uri": "https://h/x"}],
             "files": [{"path": "f", "size": None, "digest": None}]}
    with pytest.raises(LockFormatError, match="used twice"):
        parse_lock({"version": 1, "weights": [entry, entry]})
    with pytest.raises(LockFormatError, match="second file at 't/f'"):
        parse_lock({"version": 1, "weights": [entry, {**entry, "name": "n"}]})


def test_dotdot_lock_never_writes_outside_root(server, tmp_path):
    raw = make_lock(server)
    raw["weights"][0]["files"][0]["path"] = "../../escaped.bin"
    with pytest.raises(LockFormatError, match="relative path inside the weights folder"):
        parse_lock(raw)
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "root/models").symlink_to(tmp_path / "outside")  # a symlink escape
    with pytest.raises(WeightsMissing, match="unsafe path"):
        fetch(tmp_path / "root", parse_lock(make_lock(server)))
    assert not any((tmp_path / "outside").rglob("*")), "nothing written through the symlink"


def test_save_lock_round_trips_in_canonical_form(tmp_path):
    lock = load_lock(DEFAULT_LOCK)
    out = tmp_path / "weights.lock"
    save_lock(lock, out)
    assert load_lock(out) == lock
    assert out.read_text() == DEFAULT_LOCK.read_text(), "the repo lock is kept canonical"


# ---------------------------------------------------------------- lock filling and trees


def test_lock_fill_measures_null_records_only(server, tmp_path):
    raw = make_lock(server)
    raw["weights"][0]["files"][0].update(size=None, digest=None)  # alpha/model.bin
    raw["weights"][1]["files"][0]["digest"] = None  # beta: size known, digest not
    path = tmp_path / "weights.lock"
    path.write_text(json.dumps(raw))
    assert weights_fetch.lock_fill(path) == 2
    filled = load_lock(path)
    assert filled == parse_lock(make_lock(server))
    assert not server.hits("/repo/alpha/sub/config.json"), "pinned records are not downloaded"


def test_lock_fill_refuses_a_lock_that_disagrees_with_the_server(server, tmp_path):
    raw = make_lock(server)
    raw["weights"][1]["files"][0].update(size=3, digest=None)
    path = tmp_path / "weights.lock"
    path.write_text(json.dumps(raw))
    with pytest.raises(WeightsMissing, match="size mismatch: models/beta/weights.pt"):
        weights_fetch.lock_fill(path)
    assert json.loads(path.read_text()) == raw, "the lock is left untouched"


def test_lock_fill_pins_a_branch_revision_to_its_commit(server, tmp_path):
    """A source at `main` is rewritten to the commit the hub's revision API names, and the
    files are measured at that commit; fetch refuses the lock until then."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    data = b"GGUF" + bytes(range(200))
    server.files["/api/models/org/model-GGUF/revision/main"] = json.dumps({"sha": sha}).encode()
    server.files[f"/org/model-GGUF/resolve/{sha}/model.gguf"] = data
    raw = {"version": 1, "weights": [{
        "name": "gguf", "target": "models/gguf", **PROFILE_KEYS,
        "sources": [{"uri": f"{server.url}/org/model-GGUF/resolve/main"}],
        "files": [{"path": "model.gguf", "size": None, "digest": None}]}]}
    path = tmp_path / "weights.lock"
    path.write_text(json.dumps(raw))
    assert not load_lock(path).weights[0].sources[0].revision_pinned
    with pytest.raises(WeightsMissing, match="revision not a commit: gguf"):
        fetch(tmp_path / "w", load_lock(path), allow_unpinned=False)
    assert weights_fetch.lock_fill(path) == 1
    entry = load_lock(path).weights[0]
    assert entry.sources[0].uri == f"{server.url}/org/model-GGUF/resolve/{sha}"
    assert entry.sources[0].revision_pinned
    assert entry.files[0].size == len(data) and entry.files[0].digest == digest(data)
    assert not server.hits("/org/model-GGUF/resolve/main/model.gguf"), "measured at the commit"


def test_lock_from_tree_lists_the_files_present(tmp_path):
    template = parse_lock({"version": 1, "weights": [
        {"name": name, "target": target, **PROFILE_KEYS, "sources": [{"uri": f"https://h/{name}"}],
         "files": [{"path": path, "size": size, "digest": None}]}
        for name, target, path, size in (("enc", "ip/models/enc", "model.safetensors", 9),
                                         ("llm", "qwen", "m.gguf", None),
                                         ("proj", "qwen", "mmproj.gguf", None),
                                         ("absent", "nothing", "x", None))]})
    files = {"ip/models/enc/config.json": b"{}", "ip/models/enc/model.safetensors": b"tiny",
             "qwen/m.gguf": b"GGUF1", "qwen/mmproj.gguf": b"GGUF22", "qwen/extra.txt": b"x"}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    tiny = lock_from_tree(tmp_path, template)
    got = {e.name: {f.path: (f.size, f.digest) for f in e.files} for e in tiny.weights}
    assert got == {
        "enc": {"config.json": (2, digest(b"{}")), "model.safetensors": (4, digest(b"tiny"))},
        "llm": {"m.gguf": (5, digest(b"GGUF1")), "extra.txt": (1, digest(b"x"))},
        "proj": {"mmproj.gguf": (6, digest(b"GGUF22"))},
    }
    verify(tmp_path, tiny)


# ---------------------------------------------------------------- CLI


def test_cli_fetch_and_verify(server, tmp_path, capsys):
    lock_path = tmp_path / "weights.lock"
    lock_path.write_text(json.dumps(make_lock(server)))
    root = tmp_path / "w"
    assert main(["fetch", str(root), "--lock", str(lock_path), "--workers", "2"]) == 0
    assert main(["verify", str(root), "--lock", str(lock_path)]) == 0
    (root / "models/beta/weights.pt").write_bytes(b"x")
    assert main(["verify", str(root), "--lock", str(lock_path)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "size mismatch: models/beta/weights.pt" in err
    assert main(["verify", str(root), "--lock", str(tmp_path / "absent.lock")]) == 1
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- the repo's weights.lock

# SPEC "Models" table row -> the lock entries that hold it.
SPEC_MODELS = {
    "CyberRealistic XL v7": ["cyberrealistic-xl-v7"],
    "Juggernaut XI": ["juggernaut-xi"],
    "CLIP-ViT-H-14": ["clip-vit-h-14-image-encoder"],
    "IP-Adapter FaceID Plus v2 SDXL": ["ip-adapter-faceid-plusv2-sdxl"],
    "IP-Adapter Plus Face SDXL": ["ip-adapter-plus-face-sdxl"],
    "InstantID ControlNet + adapter": ["instantid"],
    "SAM ViT-B": ["sam-vit-b"],
    "InsightFace antelopev2 + buffalo_l": ["insightface-antelopev2", "insightface-buffalo-l"],
    "YOLOv8m-face": ["yolov8m-face"],
    "Qwen2.5-VL-3B Q4_K_M GGUF (+ its vision projector)": ["qwen25-vl-3b-q4km",
                                                          "qwen25-vl-3b-mmproj"],
}
PINNED_URI = re.compile(r"https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/([0-9a-f]{40}|main)"
                        r"(/[\w./-]+)?")
# The OpenCV model zoo keeps its ONNX files in Git LFS: GitHub serves their bytes here.
GITHUB_LFS_URI = re.compile(r"https://media\.githubusercontent\.com/media/opencv/opencv_zoo/"
                            r"([0-9a-f]{40})/models/[\w./-]+")


@pytest.fixture(scope="module")
def repo_lock():
    return load_lock(PROJECT_ROOT / "weights.lock")


def test_repo_lock_lists_every_spec_model(repo_lock):
    spec = (PROJECT_ROOT.parent / "shared" / "SPEC.md")
    if spec.is_file():  # the rows themselves, when the spec is beside the checkout
        for row in SPEC_MODELS:
            assert f"| {row} |" in spec.read_text(), f"SPEC row {row!r} renamed?"
    names = {e.name for e in repo_lock.weights}
    for row, entries in SPEC_MODELS.items():
        assert set(entries) <= names, f"{row}: {set(entries) - names} missing from weights.lock"
    config = {e.name: e for e in repo_lock.weights}["sdxl-base-config"]
    assert not [f for f in config.files if f.path.endswith((".safetensors", ".bin"))]


def test_repo_lock_covers_every_layout_path(repo_lock):
    layout = Layout(Path("/w"))
    locked = {Path("/w") / e.target / f.path for e, f in repo_lock.items()}
    # warm_up_reference is optional (the twins bring one; real trees use the bundled portrait).
    props = [n for n, v in vars(Layout).items()
             if isinstance(v, property) and n != "warm_up_reference"]
    assert len(props) >= 18
    for name in props:
        path = getattr(layout, name)
        assert path in locked or any(path in p.parents for p in locked), \
            f"Layout.{name} ({path}) is not covered by weights.lock"
    for folder, names in {
        layout.image_encoder: {"config.json", "model.safetensors"},
        layout.instantid_controlnet: {"config.json", "diffusion_pytorch_model.safetensors"},
        layout.antelopev2: {"1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx",
                            "scrfd_10g_bnkps.onnx"},
        layout.buffalo_l: {"1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx",
                           "w600k_r50.onnx"},
        layout.sdxl_config: {
            "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
            "text_encoder_2/config.json", "unet/config.json", "vae/config.json",
            *(f"{t}/{n}" for t in ("tokenizer", "tokenizer_2") for n in (
                "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"))},
    }.items():
        assert {p.relative_to(folder).as_posix() for p in locked if folder in p.parents} == names
    for path in layout.text_files():
        assert path in locked


def test_repo_lock_sources_are_pinned_or_documented(repo_lock):
    doc = (PROJECT_ROOT / "docs" / "weights.md").read_text()
    for entry in repo_lock.weights:
        for source in entry.sources:
            m = PINNED_URI.fullmatch(source.uri) or GITHUB_LFS_URI.fullmatch(source.uri)
            assert m, f"{entry.name}: {source.uri} is neither a huggingface.co resolve URL " \
                "nor an opencv_zoo LFS URL at a commit"
            assert source.revision_pinned == (m.group(1) != "main")
            if m.group(1) == "main":
                assert f"`{entry.name}`" in doc and "main" in doc, \
                    f"{entry.name} is unpinned (main) but docs/weights.md does not say so"
        for f in entry.files:
            if not f.pinned:
                assert f"`{entry.name}`" in doc, f"{entry.name}/{f.path} unpinned, undocumented"
    gated = {e.name for e in repo_lock.weights if e.gated}
    assert gated == {"juggernaut-xi"}
    for e in repo_lock.weights:
        assert e.license, f"{e.name} has no license note"
        if e.name.startswith("insightface"):
            assert "non-commercial" in e.license


def test_repo_lock_ships_no_file_the_code_never_loads(repo_lock):
    """The FaceID `.bin` carries its LoRA; the UI copy of it (371 MB) is dead weight."""
    paths = {f.path for _, f in repo_lock.items()}
    assert "ip-adapter-faceid-plusv2_sdxl.bin" in paths
    assert not any(p.endswith("_lora.safetensors") for p in paths)
    assert not hasattr(Layout, "faceid_plusv2_lora")


def test_repo_lock_takes_the_pickers_pair_from_one_conversion(repo_lock):
    """Issue 22: the model and its vision projector come from the same repo at the same commit
    (ggml-org's upstream conversion), fully pinned, at the Layout's paths."""
    entries = {e.name: e for e in repo_lock.weights}
    model, mmproj = entries["qwen25-vl-3b-q4km"], entries["qwen25-vl-3b-mmproj"]
    assert model.sources == mmproj.sources and len(model.sources) == 1
    source = model.sources[0]
    assert source.revision_pinned
    assert source.uri == ("https://huggingface.co/ggml-org/Qwen2.5-VL-3B-Instruct-GGUF/resolve/"
                          "5037fcf163dd95d1e41d1974465f0898ed108ca2")
    layout = Layout(Path("/w"))
    for entry, path in ((model, layout.picker_model), (mmproj, layout.picker_mmproj)):
        (f,) = entry.files
        assert f.pinned and Path("/w") / entry.target / f.path == path
    assert [f.size for f in model.files + mmproj.files] == [1_929_901_056, 1_338_428_128]
