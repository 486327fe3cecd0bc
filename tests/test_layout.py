"""`pipeline.layout`: where the weights folder is, where each model file lives under it, and the
start-up check that names every missing file at once.

That every Layout path is covered by `weights.lock` is tests/test_weights.py; here the table is
pinned against the paths the images bake and the loaders read.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from pipeline.errors import WeightsMissing
from pipeline.layout import DEFAULT_WEIGHTS_DIR, PROJECT_ROOT, Layout
from pipeline.settings import Settings

# The production tree, relative to WEIGHTS_DIR (what `python -m pipeline.weights fetch` writes and
# both images bake into /src/weights).
PRODUCTION_PATHS = {
    "sdxl_config": "sdxl-base-config",
    "cyberrealistic": "cyberrealistic-xl/CyberRealisticXLPlay_V7.0_FP16.safetensors",
    "juggernaut": "juggernaut-xi/Juggernaut-XI-byRunDiffusion.safetensors",
    "image_encoder": "ip-adapter/models/image_encoder",
    "ip_adapter_dir": "ip-adapter",
    "ip_adapter_plus_face": "ip-adapter/sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
    "faceid_dir": "ip-adapter-faceid",
    "faceid_plusv2": "ip-adapter-faceid/ip-adapter-faceid-plusv2_sdxl.bin",
    "instantid_dir": "instantid",
    "instantid_controlnet": "instantid/ControlNetModel",
    "instantid_adapter": "instantid/ip-adapter.bin",
    "sam_vit_b": "sam/sam_vit_b_01ec64.pth",
    "insightface_root": "insightface",
    "antelopev2": "insightface/models/antelopev2",
    "buffalo_l": "insightface/models/buffalo_l",
    "yolo_face": "adetailer/face_yolov8m.pt",
    "picker_model": "qwen25-vl/Qwen2.5-VL-3B-Instruct-Q4_K_M.gguf",
    "picker_mmproj": "qwen25-vl/mmproj-Qwen2.5-VL-3B-Instruct-f16.gguf",
    "warm_up_reference": "warm-up/reference.png",
}


def path_properties() -> list[str]:
    """Every Path-valued property of Layout."""
    probe = Layout(Path("/probe"))
    return [name for name, value in vars(Layout).items()
            if isinstance(value, property) and isinstance(getattr(probe, name), Path)]


# ------------------------------------------------------------------------- the weights root


def test_default_weights_dir_is_the_projects_weights_folder():
    assert (PROJECT_ROOT / "predict.py").is_file() and (PROJECT_ROOT / "pipeline").is_dir()
    assert DEFAULT_WEIGHTS_DIR == PROJECT_ROOT / "weights"
    assert DEFAULT_WEIGHTS_DIR.is_absolute()


@pytest.mark.parametrize("env", [{}, {"WEIGHTS_DIR": ""}])
def test_unset_weights_dir_means_the_default(env):
    assert Settings.from_env(env).weights_dir == DEFAULT_WEIGHTS_DIR
    assert Settings().weights_dir == DEFAULT_WEIGHTS_DIR


def test_weights_dir_variable_points_the_layout(tmp_path):
    settings = Settings.from_env({"WEIGHTS_DIR": str(tmp_path)})
    assert settings.weights_dir == tmp_path
    layout = Layout(settings.weights_dir)
    assert layout.root == tmp_path
    assert layout.cyberrealistic == tmp_path / PRODUCTION_PATHS["cyberrealistic"]


# ---------------------------------------------------------------------------- the table


@pytest.mark.parametrize("name, relative", sorted(PRODUCTION_PATHS.items()))
def test_production_paths(name, relative):
    assert getattr(Layout(Path("/w")), name) == Path("/w") / PurePosixPath(relative)


def test_every_path_lies_under_the_root_and_follows_it():
    names = path_properties()
    assert set(PRODUCTION_PATHS) <= set(names)
    first, second = Layout(Path("/a/weights")), Layout(Path("/elsewhere"))
    for name in names:
        one, two = getattr(first, name), getattr(second, name)
        assert one.is_relative_to(first.root) and one != first.root, name
        assert one.relative_to(first.root) == two.relative_to(second.root), name
        assert ".." not in one.relative_to(first.root).parts, name


def test_no_two_files_share_a_path():
    layout = Layout(Path("/w"))
    paths = [getattr(layout, name) for name in path_properties()]
    assert len(set(paths)) == len(paths)


def test_layout_is_a_value():
    assert Layout(Path("/w")) == Layout(Path("/w")) and hash(Layout(Path("/w")))
    with pytest.raises(AttributeError):
        Layout(Path("/w")).root = Path("/x")  # frozen


def test_text_mode_files():
    layout = Layout(Path("/w"))
    assert layout.text_files() == [layout.sdxl_config / "model_index.json",
                                   layout.cyberrealistic]


# ------------------------------------------------------------------------- check_present


def test_check_present_names_every_missing_file_in_one_error(tmp_path):
    layout = Layout(tmp_path)
    present = tmp_path / "present.bin"
    present.write_bytes(b"x")
    missing = [layout.cyberrealistic, layout.sam_vit_b, layout.picker_model]
    with pytest.raises(WeightsMissing) as excinfo:
        layout.check_present([missing[0], present, *missing[1:]])
    message = str(excinfo.value)
    assert message.startswith(f"3 model file(s) missing under {tmp_path}: ")
    for path in missing:
        assert str(path) in message
    assert str(present) not in message
    # the ways to fill the folder, and the variable that points to it
    assert "python -m pipeline.weights fetch" in message
    assert "python -m twins write" in message and "WEIGHTS_DIR" in message


def test_check_present_lists_missing_files_in_the_order_given(tmp_path):
    layout = Layout(tmp_path)
    order = [layout.yolo_face, layout.antelopev2 / "glintr100.onnx", layout.juggernaut]
    with pytest.raises(WeightsMissing) as excinfo:
        layout.check_present(order)
    listed = str(excinfo.value).split(": ", 1)[1]
    positions = [listed.index(str(path)) for path in order]
    assert positions == sorted(positions)


def test_check_present_passes_when_everything_is_there(tmp_path):
    layout = Layout(tmp_path)
    layout.check_present([])
    layout.antelopev2.mkdir(parents=True)  # folders count as present
    layout.sam_vit_b.parent.mkdir(parents=True)
    layout.sam_vit_b.write_bytes(b"")
    layout.check_present([layout.antelopev2, layout.sam_vit_b])


def test_a_dangling_link_is_missing(tmp_path):
    layout = Layout(tmp_path)
    layout.sam_vit_b.parent.mkdir(parents=True)
    layout.sam_vit_b.symlink_to(tmp_path / "gone.pth")
    with pytest.raises(WeightsMissing, match="1 model file"):
        layout.check_present([layout.sam_vit_b])


# ---------------------------------------------------------------- paths the loaders read


@pytest.fixture(scope="module")
def sdxl_only(tmp_path_factory) -> Layout:
    """A weights tree holding the SDXL twins and nothing else (no conversion)."""
    from twins.sdxl import write_sdxl_twins

    layout = Layout(tmp_path_factory.mktemp("sdxl-only"))
    write_sdxl_twins(layout)
    return layout


def test_start_up_names_the_text_files_under_weights_dir(tmp_path):
    from pipeline.assemble import load_models

    with pytest.raises(WeightsMissing) as excinfo:
        load_models(Settings.from_env({"WEIGHTS_DIR": str(tmp_path), "PIPELINE_DEVICE": "cpu"}))
    message = str(excinfo.value)
    layout = Layout(tmp_path)
    assert message.startswith(f"2 model file(s) missing under {tmp_path}")
    assert str(layout.sdxl_config / "model_index.json") in message
    assert str(layout.cyberrealistic) in message


def test_text_loader_reads_the_layouts_sdxl_files(sdxl_only):
    from pipeline.convert import sdxl_files

    for name in ("cyberrealistic", "juggernaut"):
        files = sdxl_files(sdxl_only, name)
        # Not converted: the single file, read with the shared config folder.
        assert files == [sdxl_only.sdxl_config / "model_index.json", getattr(sdxl_only, name)]
        sdxl_only.check_present(files)


def test_face_loader_names_every_face_file_it_lacks(sdxl_only):
    from pipeline.faces import face_model_files, load_face_models

    files = face_model_files(sdxl_only)
    assert sdxl_only.sam_vit_b in files and sdxl_only.yolo_face in files
    assert all(path.is_relative_to(sdxl_only.insightface_root)
               for path in files if path not in (sdxl_only.sam_vit_b, sdxl_only.yolo_face))
    with pytest.raises(WeightsMissing) as excinfo:
        load_face_models(sdxl_only, "cpu")
    message = str(excinfo.value)
    assert message.startswith(f"{len(files)} model file(s) missing")
    assert all(str(path) in message for path in files)


def test_identity_loader_names_every_identity_file_it_lacks(sdxl_only):
    from pipeline.identity import identity_files

    files = identity_files(sdxl_only)
    expected_missing = [sdxl_only.image_encoder / "config.json", sdxl_only.faceid_plusv2,
                        sdxl_only.ip_adapter_plus_face,
                        sdxl_only.instantid_controlnet / "config.json",
                        sdxl_only.instantid_adapter]
    assert sdxl_only.juggernaut in files  # present: the refiner's checkpoint
    assert set(expected_missing) <= set(files)
    with pytest.raises(WeightsMissing) as excinfo:
        sdxl_only.check_present(files)
    message = str(excinfo.value)
    assert message.startswith(f"{len(expected_missing)} model file(s) missing")
    assert all(str(path) in message for path in expected_missing)
    assert str(sdxl_only.juggernaut) not in message
