"""Model profiles in `weights.lock` (issue 23): the `commercial` and `profiles` keys, selecting a
profile's entries, the commercial guard (a lock bug or a leftover file must not put a
non-commercial file in a commercial image), the `licences` table, `--profile` on fetch, verify
and lock (against the loopback file server of tests/test_weights.py), the one-line error of an
unpinned lock, `pipeline.convert --profile`, and the repo lock's own profile data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pipeline import convert
from pipeline.errors import LockFormatError, WeightsMissing
from pipeline.layout import PROJECT_ROOT, Layout
from pipeline.profiles import COMMERCIAL, PROFILES, SEED
from pipeline.weights import fetch as weights_fetch
from pipeline.weights.__main__ import licence_table, main
from pipeline.weights.lock import (
    CONVERTED_MANIFESTS,
    LockSource,
    load_lock,
    lock_to_dict,
    noncommercial_present,
    parse_lock,
)
from tests.test_weights import FileServer, digest, make_lock


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("HF_TOKEN", "HF_TOKEN_FILE", "PIPELINE_PROFILE"):
        monkeypatch.delenv(name, raising=False)


def two_profile_lock(server: FileServer, *, beta_profiles=("seed",)) -> dict:
    """`alpha` (commercial, both profiles) and `beta` (non-commercial, seed only by default)."""
    raw = make_lock(server)
    alpha, beta = raw["weights"]
    beta.update(commercial=False, profiles=list(beta_profiles), license="research only")
    alpha.update(license="Apache-2.0")
    return raw


def write_lock(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "weights.lock"
    path.write_text(json.dumps(raw))
    return path


def entry(name: str, **keys) -> dict:
    return {"name": name, "target": name, "commercial": True, "profiles": ["seed"],
            "sources": [{"uri": "https://h/x"}],
            "files": [{"path": "f", "size": None, "digest": None}], **keys}


# ---------------------------------------------------------------- the format


@pytest.mark.parametrize(("change", "needle"), [
    ({"commercial": None}, "`weights[3].commercial` must be true or false"),
    ({"commercial": "yes"}, "`weights[3].commercial` must be true or false"),
    ({"profiles": None}, "`weights[3].profiles` must be a non-empty list"),
    ({"profiles": []}, "`weights[3].profiles` must be a non-empty list"),
    ({"profiles": "seed"}, "`weights[3].profiles` must be a non-empty list"),
    ({"profiles": ["seed", "paid"]}, "`weights[3].profiles[1]` must be one of seed, commercial"),
    ({"profiles": ["seed", "seed"]}, "`weights[3].profiles[1]` repeats 'seed'"),
])
def test_profile_keys_are_required_and_errors_name_them(change, needle):
    entries = [entry(f"m{i}") for i in range(4)]
    entries[3].update(change)
    entries[3] = {k: v for k, v in entries[3].items() if v is not None}
    with pytest.raises(LockFormatError) as err:
        parse_lock({"version": 1, "weights": entries})
    assert needle in str(err.value)


def test_canonical_key_order_puts_licence_facts_after_the_target():
    raw = {"version": 1, "weights": [entry("m", gated=True, license="x", profiles=["commercial",
                                                                                   "seed"])]}
    saved = lock_to_dict(parse_lock(raw))["weights"][0]
    assert list(saved) == ["name", "target", "license", "commercial", "profiles", "gated",
                           "sources", "files"]
    assert saved["profiles"] == ["commercial", "seed"], "the lock's order is kept"


def test_for_profile_selects_and_the_commercial_profile_refuses_a_non_commercial_entry():
    lock = parse_lock({"version": 1, "weights": [
        entry("both", profiles=["seed", "commercial"]), entry("seed-only", commercial=False),
        entry("new", profiles=["commercial"])]})
    assert [e.name for e in lock.for_profile(SEED).weights] == ["both", "seed-only"]
    assert [e.name for e in lock.for_profile(COMMERCIAL).weights] == ["both", "new"]
    with pytest.raises(LockFormatError, match="unknown profile 'paid'"):
        lock.for_profile("paid")
    broken = parse_lock({"version": 1, "weights": [
        entry("ok", profiles=["commercial"]),
        entry("bad", commercial=False, profiles=["seed", "commercial"])]})
    assert [e.name for e in broken.for_profile(SEED).weights] == ["bad"]
    with pytest.raises(LockFormatError, match=r"commercial: false\): bad;"):
        broken.for_profile(COMMERCIAL)


def test_a_github_lfs_source_at_a_branch_is_not_pinned():
    base = "https://media.githubusercontent.com/media/opencv/opencv_zoo"
    assert LockSource(f"{base}/{'a' * 40}/models/face_detection_yunet").revision_pinned
    assert not LockSource(f"{base}/main/models/face_detection_yunet").revision_pinned


def test_the_manifest_glob_is_the_converters_layout():
    assert CONVERTED_MANIFESTS == f"{convert.CONVERTED_DIR}/*/{convert.MANIFEST}"


# ---------------------------------------------------------------- the CLI


def test_licences_prints_one_row_per_entry(server, tmp_path, capsys):
    raw = two_profile_lock(server)
    raw["weights"][1]["license"] = "research only " * 12  # wraps
    path = write_lock(tmp_path, raw)
    assert main(["licences", "--lock", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "commercial", "profiles", "licence"]
    starts = [line.split()[:2] for line in lines[1:] if not line.startswith(" ")]
    assert starts == [["alpha", "yes"], ["beta", "no"]]
    assert "seed, commercial" in lines[1] and "Apache-2.0" in lines[1]
    assert len(lines) > 3, "the long licence wraps onto indented lines"
    assert main(["licences", "--lock", str(path), "--profile", "commercial"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["alpha"]


def test_fetch_and_verify_act_on_the_chosen_profile_only(server, tmp_path, capsys,
                                                          monkeypatch):
    path = write_lock(tmp_path, two_profile_lock(server))
    root = tmp_path / "w"
    assert main(["fetch", str(root), "--lock", str(path), "--profile", "commercial"]) == 0
    assert {p for p, _ in server.requests} == {"/repo/alpha/model.bin",
                                                "/repo/alpha/sub/config.json"}
    assert not (root / "models/beta").exists()
    assert main(["verify", str(root), "--lock", str(path), "--profile", "commercial"]) == 0
    assert main(["verify", str(root), "--lock", str(path), "--profile", "seed"]) == 1
    assert "missing: models/beta/weights.pt" in capsys.readouterr().err
    # Without --profile: $PIPELINE_PROFILE, else seed.
    assert main(["verify", str(root), "--lock", str(path)]) == 1
    monkeypatch.setenv("PIPELINE_PROFILE", "commercial")
    assert main(["verify", str(root), "--lock", str(path)]) == 0
    monkeypatch.setenv("PIPELINE_PROFILE", "paid")
    assert main(["verify", str(root), "--lock", str(path)]) == 1
    assert "PIPELINE_PROFILE" in capsys.readouterr().err
    monkeypatch.delenv("PIPELINE_PROFILE")
    assert main(["fetch", str(root), "--lock", str(path)]) == 0
    assert (root / "models/beta/weights.pt").is_file()
    assert main(["verify", str(root), "--lock", str(path), "--profile", "all"]) == 0


def test_a_commercial_fetch_refuses_a_lock_that_gives_it_a_non_commercial_entry(
        server, tmp_path, capsys):
    path = write_lock(tmp_path, two_profile_lock(server, beta_profiles=("seed", "commercial")))
    for command in (["fetch", str(tmp_path / "w")], ["verify", str(tmp_path / "w")],
                    ["lock"]):
        assert main([*command, "--lock", str(path), "--profile", "commercial"]) == 1
        err = capsys.readouterr().err
        assert "profile 'commercial' lists entries whose licence does not allow commercial " \
               "use (commercial: false): beta" in err
    assert server.requests == [], "nothing downloaded"
    assert not (tmp_path / "w").exists()


def test_commercial_verify_fails_on_a_non_commercial_file_or_conversion(server, tmp_path,
                                                                        capsys):
    path = write_lock(tmp_path, two_profile_lock(server))
    root = tmp_path / "w"
    assert main(["fetch", str(root), "--lock", str(path), "--profile", "all"]) == 0
    args = ["verify", str(root), "--lock", str(path), "--profile", "commercial"]
    assert main(args) == 1
    assert "non-commercial file present: models/beta/weights.pt (beta: commercial: false)" \
        in capsys.readouterr().err
    (root / "models/beta/weights.pt").unlink()
    assert main(args) == 0
    made = root / "converted" / "juggernaut"
    made.mkdir(parents=True)
    (made / "manifest.json").write_text(json.dumps({"source": "models/beta/weights.pt"}))
    (root / "converted" / "junk").mkdir()
    (root / "converted" / "junk" / "manifest.json").write_text("[not an object]")
    assert main(args) == 1
    line = ("non-commercial conversion present: converted/juggernaut (made from "
            "models/beta/weights.pt, beta: commercial: false)")
    assert line in capsys.readouterr().err
    assert noncommercial_present(root, load_lock(path)) == [line], "junk manifests are skipped"


def test_an_unpinned_lock_stops_fetch_with_one_line_naming_the_lock_step(tmp_path, capsys):
    """The real-weights path: the repo lock with any record unpinned (as CyberRealistic XL is
    until someone runs `lock`) stops before the first download, in one line."""
    raw = copy.deepcopy(lock_to_dict(load_lock(PROJECT_ROOT / "weights.lock")))
    for e in raw["weights"]:
        if e["name"] == "cyberrealistic-xl-v7":
            e["files"][0].update(size=None, digest=None)
    path = write_lock(tmp_path, raw)
    for profile in PROFILES:
        assert main(["fetch", str(tmp_path / "w"), "--lock", str(path), "--profile",
                     profile]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert "unpinned: cyberrealistic-xl/CyberRealisticXLPlay_V7.0_FP16.safetensors" in err
        assert "run `python -m pipeline.weights lock` on a machine with network" in err
        assert "review and commit the weights.lock diff, then fetch again" in err
    assert not (tmp_path / "w").exists(), "nothing downloaded, nothing created"


def test_lock_fills_only_the_chosen_profiles_records(server, tmp_path):
    raw = two_profile_lock(server)
    for e in raw["weights"]:
        e["files"][0].update(size=None, digest=None)
    path = write_lock(tmp_path, raw)
    assert weights_fetch.lock_fill(path, profile=COMMERCIAL) == 1
    filled = {e.name: e.files for e in load_lock(path).weights}
    assert filled["alpha"][0].pinned
    assert filled["beta"][0].size is None, "seed-only records are left to a seed lock run"
    assert not server.hits("/repo/beta/weights.pt")
    assert main(["lock", "--lock", str(path)]) == 0, "default: every entry"
    assert load_lock(path).weights[1].files[0].digest == digest(
        server.files["/repo/beta/weights.pt"])


# ---------------------------------------------------------------- pipeline.convert --profile


def _current_conversion(root: Path, name: str, source: str) -> None:
    """A converted/<name>/ that read_manifest accepts (its source file absent: not stale)."""
    folder = root / convert.CONVERTED_DIR / name
    for component in convert.MODEL_COMPONENTS:
        (folder / component).mkdir(parents=True)
    (folder / convert.MANIFEST).write_text(json.dumps({
        "format": convert.FORMAT_VERSION, "name": name, "source": source, "fingerprint": {},
        "dtype": "float16", "components": {c: {"path": f"{name}/{c}", "digest": "x"}
                                           for c in convert.MODEL_COMPONENTS}}))


def test_convert_commercial_needs_no_juggernaut_and_drops_its_conversion(tmp_path):
    layout = Layout(tmp_path)
    assert convert.PROFILE_CHECKPOINTS == {SEED: ("cyberrealistic", "juggernaut"),
                                           COMMERCIAL: ("cyberrealistic",)}
    _current_conversion(tmp_path, "cyberrealistic", "cyberrealistic-xl/x.safetensors")
    _current_conversion(tmp_path, "juggernaut", "juggernaut-xi/y.safetensors")
    assert not layout.juggernaut.exists()
    assert list(convert.convert_weights(tmp_path, profile=SEED)) == ["cyberrealistic",
                                                                     "juggernaut"]
    assert (tmp_path / "converted/juggernaut").is_dir(), "seed keeps both"
    assert convert.main([str(tmp_path), "--profile", "commercial", "--remove-sources"]) == 0
    assert not (tmp_path / "converted/juggernaut").exists()
    assert (tmp_path / "converted/cyberrealistic/manifest.json").is_file()
    with pytest.raises(WeightsMissing, match="Juggernaut"):
        convert.convert_weights(tmp_path, profile=SEED)  # seed still needs its checkpoint


# ---------------------------------------------------------------- the repo's weights.lock

COMMERCIAL_ENTRIES = ["sdxl-base-config", "cyberrealistic-xl-v7", "clip-vit-h-14-image-encoder",
                      "ip-adapter-plus-face-sdxl", "fast-lora", "sam-vit-b", "yunet", "sface",
                      "qwen2-vl-2b-q4km", "qwen2-vl-2b-mmproj"]
NON_COMMERCIAL = ["juggernaut-xi", "ip-adapter-faceid-plusv2-sdxl", "instantid",
                  "insightface-antelopev2", "insightface-buffalo-l", "yolov8m-face",
                  "qwen25-vl-3b-q4km", "qwen25-vl-3b-mmproj"]


def test_repo_lock_profiles_and_licences():
    lock = load_lock(PROJECT_ROOT / "weights.lock")
    assert [e.name for e in lock.for_profile(COMMERCIAL).weights] == COMMERCIAL_ENTRIES
    new = {"yunet", "sface", "qwen2-vl-2b-q4km", "qwen2-vl-2b-mmproj"}
    assert [e.name for e in lock.for_profile(SEED).weights] == [
        e.name for e in lock.weights if e.name not in new], "seed: every file it had, no other"
    assert sorted(e.name for e in lock.weights if not e.commercial) == sorted(NON_COMMERCIAL)
    for e in lock.for_profile(COMMERCIAL).weights:
        assert e.commercial and e.license and "non-commercial" not in e.license, e.name
    for e in lock.weights:
        if not e.commercial:
            assert "non-commercial" in e.license or "Research" in e.license \
                or "API" in e.license, f"{e.name}: say why it is not commercial"


def test_repo_lock_pins_the_commercial_profiles_new_files_at_the_layout_paths():
    entries = {e.name: e for e in load_lock(PROJECT_ROOT / "weights.lock").weights}
    layout = Layout(Path("/w"))
    for name, path in (("yunet", layout.yunet), ("sface", layout.sface),
                       ("qwen2-vl-2b-q4km", layout.commercial_picker_model),
                       ("qwen2-vl-2b-mmproj", layout.commercial_picker_mmproj)):
        (f,) = entries[name].files
        assert Path("/w") / entries[name].target / f.path == path
        assert f.pinned and all(s.revision_pinned for s in entries[name].sources)
    zoo = "https://media.githubusercontent.com/media/opencv/opencv_zoo/" \
          "966be4cb6eefc2a4f586ed0581bf4bbaa2533070/models/"
    assert entries["yunet"].sources[0].uri == zoo + "face_detection_yunet"
    assert entries["sface"].sources[0].uri == zoo + "face_recognition_sface"
    assert entries["yunet"].license.startswith("MIT")
    assert entries["sface"].license.startswith("Apache-2.0")
    model, mmproj = entries["qwen2-vl-2b-q4km"], entries["qwen2-vl-2b-mmproj"]
    assert model.sources == mmproj.sources == [LockSource(
        "https://huggingface.co/ggml-org/Qwen2-VL-2B-Instruct-GGUF/resolve/"
        "bb307c036e8a1ed7b663bbd0c35b41c4c9294cfd")]
    assert model.license.startswith("Apache-2.0") and mmproj.license.startswith("Apache-2.0")


def test_licences_table_of_the_repo_lock_names_every_entry():
    lock = load_lock(PROJECT_ROOT / "weights.lock")
    rows = [line for line in licence_table(lock, width=100).splitlines()[1:]
            if not line.startswith(" ")]
    assert [r.split()[0] for r in rows] == [e.name for e in lock.weights]
    assert all(len(line) <= 100 for line in licence_table(lock, width=100).splitlines())
