"""A commercial image holds no file that `weights.lock` marks `commercial: false` (issue 23).

Read statically, as tests/test_container_files.py reads the build files: weights.lock,
Dockerfile.runpod (+ its ignore file), cog.yaml and cog.commercial.yaml. `commercial_image_problems`
lists every way a commercial build could take a non-commercial file; the real files give none,
and each edit that would let one in is shown to be caught.

- The lock: the commercial profile selects only `commercial: true` entries
  (`Lock.for_profile` refuses otherwise, and so does the CLI).
- Dockerfile.runpod: fetch, verify and convert take `--profile "$PROFILE"` (the profile's
  entries only, into an empty /src/weights), `verify --profile commercial` refuses any
  non-commercial file or conversion in the tree, the worker runs `PIPELINE_PROFILE=$PROFILE`, and
  no local weights/ reaches the build context (the final `COPY . ./` would lay it over
  /src/weights).
- Cog copies the project, weights/ included: cog.commercial.yaml is cog.yaml with
  `PIPELINE_PROFILE=commercial` only, its documented steps fetch and verify `--profile
  commercial` into a weights/ emptied first, before `cog build -f cog.commercial.yaml`, and no
  build step fetches anything else.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

from pipeline.errors import LockFormatError
from pipeline.profiles import COMMERCIAL, SEED
from pipeline.weights.lock import parse_lock
from tests.test_container_files import (
    ROOT,
    env_pairs,
    ignore_rules,
    is_ignored,
    parse_dockerfile,
)

FILES = ("weights.lock", "Dockerfile.runpod", "Dockerfile.runpod.dockerignore", "cog.yaml",
         "cog.commercial.yaml")
PROFILE_ARG = {"$PROFILE", "${PROFILE}"}


class _Text:
    """A file's text where `ignore_rules` expects a path (it only calls `read_text`)."""

    def __init__(self, text: str):
        self.text = text

    def read_text(self) -> str:
        return self.text


def _profile_of(command: str) -> str | None:
    words = shlex.split(command)
    return words[words.index("--profile") + 1] if "--profile" in words[:-1] else None


def _lock_problems(text: str) -> list[str]:
    try:
        chosen = parse_lock(json.loads(text)).for_profile(COMMERCIAL)
    except LockFormatError as exc:
        return [f"weights.lock: {exc}"]
    return [f"weights.lock: {e.name} is in the commercial profile with commercial: false"
            for e in chosen.weights if not e.commercial]


def _dockerfile_problems(text: str, ignore_text: str) -> list[str]:
    found = []
    instructions = parse_dockerfile(text)
    final = [i for i in instructions if i.stage == max(i.stage for i in instructions)]
    steps = [part.strip() for i in final if i.keyword == "RUN" for part in i.args.split("&&")]
    for tool in ("pipeline.weights fetch", "pipeline.weights verify", "pipeline.convert"):
        uses = [s for s in steps if tool in s]
        if len(uses) != 1 or _profile_of(uses[0].split("python -m", 1)[-1]) not in PROFILE_ARG:
            found.append(f"Dockerfile.runpod: `{tool}` must run once with --profile \"$PROFILE\"")
    args = {k: v for i in final if i.keyword == "ARG" for k, v in env_pairs(i.args).items()}
    if args.get("PROFILE") != SEED:
        found.append("Dockerfile.runpod: the final stage needs ARG PROFILE=seed")
    env = {k: v for i in final if i.keyword == "ENV" for k, v in env_pairs(i.args).items()}
    if env.get("PIPELINE_PROFILE") not in PROFILE_ARG:
        found.append("Dockerfile.runpod: ENV PIPELINE_PROFILE=${PROFILE} missing: the worker "
                     "would run another profile than the one fetched")
    rules = ignore_rules(_Text(ignore_text))
    if not is_ignored(rules, "weights/juggernaut-xi/Juggernaut-XI-byRunDiffusion.safetensors"):
        found.append("Dockerfile.runpod.dockerignore lets a local weights/ into the context: "
                     "`COPY . ./` would lay it over the profile's /src/weights")
    return found


def _documented_steps(text: str) -> list[str]:
    """The commands of a build file's header comment (`#   python -m ...`, `#   cog build ...`)."""
    return [m.group(1).split("  #")[0].strip() for m in re.finditer(
        r"^#\s+((?:python -m|cog build|mv|rm) .*)$", text, flags=re.MULTILINE)]


def _cog_problems(seed_text: str, commercial_text: str) -> list[str]:
    found = []
    seed, commercial = yaml.safe_load(seed_text), yaml.safe_load(commercial_text)
    seed_env = [e for e in seed.get("environment", []) if e != f"PIPELINE_PROFILE={SEED}"]
    commercial_env = [e for e in commercial.get("environment", [])
                      if e != f"PIPELINE_PROFILE={COMMERCIAL}"]
    if f"PIPELINE_PROFILE={COMMERCIAL}" not in commercial.get("environment", []):
        found.append("cog.commercial.yaml: environment lacks PIPELINE_PROFILE=commercial")
    if f"PIPELINE_PROFILE={SEED}" not in seed.get("environment", []):
        found.append("cog.yaml: environment lacks PIPELINE_PROFILE=seed")
    if {**seed, "environment": seed_env} != {**commercial, "environment": commercial_env}:
        found.append("cog.commercial.yaml differs from cog.yaml beyond PIPELINE_PROFILE")
    runs = [r if isinstance(r, str) else r.get("command", "")
            for r in commercial.get("build", {}).get("run", [])]
    if any("pipeline.weights" in r or "huggingface" in r for r in runs):
        found.append("cog.commercial.yaml: a build.run step fetches weights")
    steps = _documented_steps(commercial_text)

    def first(predicate) -> int:
        return next((n for n, s in enumerate(steps) if predicate(s)), -1)

    cleared = first(lambda s: s.startswith(("mv weights ", "rm -rf weights")))
    fetched = first(lambda s: "pipeline.weights fetch weights/" in s
                    and _profile_of(s) == COMMERCIAL)
    verified = first(lambda s: "pipeline.weights verify weights/" in s
                     and _profile_of(s) == COMMERCIAL)
    converted = first(lambda s: "pipeline.convert weights/" in s
                      and _profile_of(s) == COMMERCIAL)
    built = first(lambda s: re.match(r"cog build (-f|--file) cog\.commercial\.yaml\b", s))
    if not 0 <= cleared < fetched < verified < built or not fetched < converted < built:
        found.append("cog.commercial.yaml: its steps must empty weights/, then fetch, verify "
                     "and convert --profile commercial, then `cog build -f cog.commercial.yaml`")
    other = [s for s in steps if ("pipeline.weights" in s or "pipeline.convert" in s)
             and _profile_of(s) != COMMERCIAL]
    if other:
        found.append(f"cog.commercial.yaml: steps of another profile: {other}")
    return found


def commercial_image_problems(texts: dict[str, str]) -> list[str]:
    """Every way a commercial image built from these files could hold a non-commercial file."""
    return (_lock_problems(texts["weights.lock"])
            + _dockerfile_problems(texts["Dockerfile.runpod"],
                                   texts["Dockerfile.runpod.dockerignore"])
            + _cog_problems(texts["cog.yaml"], texts["cog.commercial.yaml"]))


def repo_texts() -> dict[str, str]:
    return {name: (ROOT / name).read_text() for name in FILES}


def test_a_commercial_image_holds_no_non_commercial_file():
    assert commercial_image_problems(repo_texts()) == []


def _lock_edit(edit):
    def apply(text: str) -> str:
        data = json.loads(text)
        edit({e["name"]: e for e in data["weights"]})
        return json.dumps(data)
    return apply


@pytest.mark.parametrize(("file", "edit"), [
    ("weights.lock", _lock_edit(lambda e: e["juggernaut-xi"]["profiles"].append("commercial"))),
    ("weights.lock", _lock_edit(lambda e: e["sam-vit-b"].update(commercial=False))),
    ("weights.lock", _lock_edit(lambda e: e["yolov8m-face"]["profiles"].append("commercial"))),
    ("Dockerfile.runpod", lambda t: t.replace('fetch /src/weights --profile "$PROFILE"',
                                              "fetch /src/weights")),
    ("Dockerfile.runpod", lambda t: t.replace('fetch /src/weights --profile "$PROFILE"',
                                              "fetch /src/weights --profile all")),
    ("Dockerfile.runpod", lambda t: t.replace('verify /src/weights --profile "$PROFILE"',
                                              "verify /src/weights --profile seed")),
    ("Dockerfile.runpod", lambda t: t.replace('--remove-sources --profile "$PROFILE"',
                                              "--remove-sources")),
    ("Dockerfile.runpod", lambda t: t.replace("ENV PIPELINE_PROFILE=${PROFILE} \\\n    ", "ENV ")),
    ("Dockerfile.runpod", lambda t: t.replace("ARG PROFILE=seed", "ARG PROFILE=commercial")),
    ("Dockerfile.runpod.dockerignore", lambda t: t.replace("\nweights\n", "\n")),
    ("cog.commercial.yaml", lambda t: t.replace("PIPELINE_PROFILE=commercial",
                                                "PIPELINE_PROFILE=seed")),
    ("cog.commercial.yaml", lambda t: t.replace('python_version: "3.11"',
                                                'python_version: "3.12"')),
    ("cog.commercial.yaml", lambda t: t.replace("fetch weights/ --profile commercial",
                                                "fetch weights/")),
    ("cog.commercial.yaml", lambda t: re.sub(r"^#\s+python -m pipeline\.weights verify.*\n", "",
                                             t, flags=re.MULTILINE)),
    ("cog.commercial.yaml", lambda t: re.sub(r"^#\s+mv weights .*\n", "", t,
                                             flags=re.MULTILINE)),
    ("cog.commercial.yaml", lambda t: t.replace(
        "  run:\n", "  run:\n    - python -m pipeline.weights fetch /src/weights\n", 1)),
    ("cog.yaml", lambda t: t.replace("  - PIPELINE_PROFILE=seed\n", "")),
], ids=["lock-juggernaut-commercial", "lock-sam-non-commercial", "lock-yolo-commercial",
        "docker-fetch-no-profile", "docker-fetch-all", "docker-verify-seed",
        "docker-convert-no-profile", "docker-no-env", "docker-default-commercial",
        "dockerignore-weights", "cog-env-seed", "cog-drift", "cog-fetch-no-profile",
        "cog-no-verify", "cog-no-emptying", "cog-run-fetch", "cog-seed-env"])
def test_each_way_in_for_a_non_commercial_file_is_caught(file, edit):
    texts = repo_texts()
    changed = edit(texts[file])
    assert changed != texts[file], f"the edit no longer applies to {file}: update this test"
    texts[file] = changed
    assert commercial_image_problems(texts), f"{file}: the edit went unnoticed"
