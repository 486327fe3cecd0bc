"""The commercial profile's face picker (Qwen2-VL-2B, Apache-2.0) on its tiny twin, through the
real llama.cpp: the pair loads and answers picks, its projector check refuses the seed's
encoder (and the seed's refuses it), errors name the commercial files, and the seed's answers
are the ones it gave before there were profiles."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import pytest
from gguf import GGUFReader, GGUFWriter
from PIL import Image

from pipeline.errors import WeightsMissing
from pipeline.layout import Layout
from pipeline.picker import (
    COMMERCIAL_PICKER,
    SEED_PICKER,
    FacePicker,
    answer_grammar,
    chat_messages,
    check_projector,
    gguf_metadata,
    picker_model_spec,
)
from tests.test_picker import T1_BOXES
from twins.picker import (
    COMMERCIAL_TEXT,
    MERGE,
    PATCH_SIZE,
    QWEN2VL_VISION_FFN,
    VISION_BLOCKS,
    VISION_WIDTH,
    vocabulary,
    write_fork_era_mmproj,
    write_picker_twins,
)

THREE_FACES = T1_BOXES[:3]  # x 740, 60 and 900 on insightface's "t1"; the third is the largest


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("picker-weights"))
    write_picker_twins(layout)
    return layout


@pytest.fixture(scope="module")
def commercial(layout):
    picker = FacePicker.load(layout, profile="commercial", n_threads=2, temperature=1.0)
    yield picker
    picker.close()


@pytest.fixture(scope="module")
def group_photo() -> Image.Image:
    from insightface.data import get_image

    return Image.fromarray(get_image("t1")[:, :, ::-1].copy())


def test_profiles_name_their_pairs(layout):
    assert picker_model_spec("seed") is SEED_PICKER
    assert picker_model_spec("commercial") is COMMERCIAL_PICKER
    assert (SEED_PICKER.model(layout), SEED_PICKER.mmproj(layout)) == (layout.picker_model,
                                                                       layout.picker_mmproj)
    assert COMMERCIAL_PICKER.model(layout) == layout.commercial_picker_model
    assert COMMERCIAL_PICKER.mmproj(layout) == layout.commercial_picker_mmproj
    assert (COMMERCIAL_PICKER.licence, COMMERCIAL_PICKER.projector_type) == ("Apache-2.0",
                                                                             "qwen2vl_merger")
    for bad in ("free", None):
        with pytest.raises(ValueError, match="no face picker model for profile"):
            picker_model_spec(bad)
    with pytest.raises(ValueError, match="'free'"):
        FacePicker.load(layout, profile="free")
    with pytest.raises(ValueError, match="'free'"):
        check_projector(layout.picker_mmproj, profile="free")


def test_commercial_twin_loads_and_picks(commercial, group_photo):
    assert commercial.error is None and commercial.loads == 1
    assert commercial.spec is COMMERCIAL_PICKER
    answers = [commercial.pick(group_photo, THREE_FACES, "the woman on the left", seed=s)
               for s in range(12)]
    assert all(r.picked_by == "description" for r in answers), answers
    assert all(r.answer_raw == str(r.index + 1) for r in answers)
    assert {r.index for r in answers} <= {0, 1, 2}
    assert len({r.index for r in answers}) >= 2  # random weights: only the grammar binds it
    two = commercial.pick(group_photo, THREE_FACES[:2], "the man on the right", seed=1)
    assert two.picked_by == "description" and two.index in (0, 1)


def test_default_profile_is_the_seed(layout):
    picker = FacePicker.load(layout, n_threads=2)
    try:
        assert picker.spec is SEED_PICKER and picker.error is None
    finally:
        picker.close()


# The seed twin's answers at temperature 1 (sheet 224 px) and greedy, as the picker gave them
# before it had profiles (commit 97f35d0): the seed path is unchanged.
SEED_ANSWERS = ['3', '6', '5', '5', '6', '5', '6', '2', '5', '2', '2', '5']
SEED_GREEDY = {"the woman on the left": "5", "the man in red": "5"}


def test_seed_answers_are_unchanged(layout, group_photo):
    picker = FacePicker.load(layout, n_threads=2, temperature=1.0, max_side=224)
    try:
        assert [picker.pick(group_photo, T1_BOXES, "the man with glasses", seed=s).answer_raw
                for s in range(12)] == SEED_ANSWERS
        picker.temperature = 0.0
        assert {d: picker.pick(group_photo, T1_BOXES, d).answer_raw
                for d in SEED_GREEDY} == SEED_GREEDY
    finally:
        picker.close()


# ------------------------------------------------------------------ the twin's layout


def hf_qwen2vl_tensors() -> dict[str, tuple[int, ...]]:
    """A tiny Qwen2VLForConditionalGeneration's state dict (name -> shape), at the twin's
    sizes: Qwen2-VL's vision blocks (LayerNorm `norm1`/`norm2` with biases, fused `qkv`, a
    QuickGELU `mlp.fc1`/`fc2`), the merger (`ln_q`, `mlp.0`, `mlp.2`), the text layers, tied
    embeddings (no `lm_head`)."""
    width, ffn, merged = VISION_WIDTH, QWEN2VL_VISION_FFN, VISION_WIDTH * MERGE * MERGE
    text, kv = COMMERCIAL_TEXT.width, COMMERCIAL_TEXT.width // COMMERCIAL_TEXT.heads
    shapes: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (width, 3, 2, PATCH_SIZE, PATCH_SIZE)}
    for i in range(VISION_BLOCKS):
        b = f"visual.blocks.{i}"
        for name, shape in (("norm1", (width,)), ("norm2", (width,)),
                            ("attn.qkv", (3 * width, width)), ("attn.proj", (width, width)),
                            ("mlp.fc1", (ffn, width)), ("mlp.fc2", (width, ffn))):
            shapes[f"{b}.{name}.weight"] = shape
            shapes[f"{b}.{name}.bias"] = shape[:1]
    for name, shape in (("ln_q", (width,)), ("mlp.0", (merged, merged)), ("mlp.2", (text, merged))):
        shapes[f"visual.merger.{name}.weight"] = shape
        shapes[f"visual.merger.{name}.bias"] = shape[:1]
    shapes["model.embed_tokens.weight"] = (len(vocabulary()[0]), text)
    shapes["model.norm.weight"] = (text,)
    for i in range(COMMERCIAL_TEXT.layers):
        b = f"model.layers.{i}"
        for name, shape in (("self_attn.q_proj", (text, text)), ("self_attn.k_proj", (kv, text)),
                            ("self_attn.v_proj", (kv, text))):
            shapes[f"{b}.{name}.weight"], shapes[f"{b}.{name}.bias"] = shape, shape[:1]
        for name, shape in (("self_attn.o_proj", (text, text)),
                            ("mlp.gate_proj", (COMMERCIAL_TEXT.ffn, text)),
                            ("mlp.up_proj", (COMMERCIAL_TEXT.ffn, text)),
                            ("mlp.down_proj", (text, COMMERCIAL_TEXT.ffn)),
                            ("input_layernorm", (text,)), ("post_attention_layernorm", (text,))):
            shapes[f"{b}.{name}.weight"] = shape
    return shapes


def converted(shapes: dict[str, tuple[int, ...]], vision: bool) -> dict[str, list[int]]:
    """GGUF names and (ggml-order) shapes the converter gives those tensors: gguf-py's name map,
    the fused qkv split in three, the two-frame Conv3d split into two Conv2d kernels."""
    arch = gguf.MODEL_ARCH.MMPROJ if vision else gguf.MODEL_ARCH.QWEN2VL
    names = gguf.get_tensor_name_map(arch, VISION_BLOCKS if vision else COMMERCIAL_TEXT.layers)
    out: dict[str, list[int]] = {}
    for name, shape in shapes.items():
        if name.startswith("visual.") != vision:
            continue
        base, suffix = name.rsplit(".", 1)
        if base.endswith(".qkv"):
            for part in "qkv":
                mapped = names.get_name(base[:-3] + part)
                out[f"{mapped}.{suffix}"] = [shape[0] // 3, *shape[1:]][::-1]
        elif base == "visual.patch_embed.proj":
            kernel = [shape[0], shape[1], *shape[3:]][::-1]
            out["v.patch_embd.weight"] = out["v.patch_embd.weight.1"] = kernel
        else:
            out[f"{names.get_name(base)}.{suffix}"] = list(shape[::-1])
    return out


def twin_tensors(path: Path) -> dict[str, list[int]]:
    return {t.name: [int(x) for x in t.shape] for t in GGUFReader(path).tensors}


def test_commercial_twin_is_qwen2vl_as_the_converter_writes_it(layout):
    hf = hf_qwen2vl_tensors()
    assert twin_tensors(layout.commercial_picker_mmproj) == converted(hf, vision=True)
    assert twin_tensors(layout.commercial_picker_model) == converted(hf, vision=False)
    mmproj, model = (gguf_metadata(layout.commercial_picker_mmproj),
                     gguf_metadata(layout.commercial_picker_model))
    assert mmproj["clip.projector_type"] == "qwen2vl_merger"
    assert not {"clip.vision.n_wa_pattern", "clip.use_silu", "clip.use_gelu",
                "clip.vision.fullatt_block_indexes"} & mmproj.keys()  # QuickGELU, full attention
    assert mmproj["clip.vision.projection_dim"] == model["qwen2vl.embedding_length"] == 48
    assert gguf_metadata(layout.picker_model)["qwen2vl.embedding_length"] == 64
    check_projector(layout.commercial_picker_mmproj, profile="commercial")  # passes


def test_pairs_do_not_mix(layout):
    """The twins' text widths differ (48, 64) as the real ones do (1536, 2048), so llama.cpp
    refuses a projector of the other pair even past the projector check (mtmd's "mismatch
    between text model (n_embd = 64) and mmproj (n_embd = 48)", surfaced by llama-cpp-python
    as a failed mtmd context; the same projector loads with its own model above)."""
    from llama_cpp import Llama, LlamaGrammar

    from pipeline.picker import picker_chat_handler

    handler = picker_chat_handler()(clip_model_path=str(layout.commercial_picker_mmproj),
                                    verbose=False)
    llm = Llama(model_path=str(layout.picker_model), chat_handler=handler, n_ctx=1024,
                n_batch=1024, n_ubatch=1024, n_threads=2, verbose=False)
    try:
        with pytest.raises(ValueError, match="Failed to load mtmd context"):
            llm.create_chat_completion(
                messages=chat_messages(Image.new("RGB", (56, 56)), "Say 1."), max_tokens=4,
                grammar=LlamaGrammar.from_string(answer_grammar([1]), verbose=False))
    finally:
        llm.close()


# ------------------------------------------------------------------ the projector check


def test_each_profile_refuses_the_others_projector(layout):
    with pytest.raises(WeightsMissing) as caught:
        check_projector(layout.picker_mmproj, profile="commercial")
    message = str(caught.value)
    assert message.startswith(f"{layout.picker_mmproj.name}: clip.projector_type is "
                              "'qwen2.5vl_merger', not 'qwen2vl_merger'; llama.cpp would run it "
                              "as Qwen2.5-VL (RMSNorm, window attention)")
    assert str(layout.picker_mmproj) in message and "commercial profile's" in message
    assert "ggml-org/Qwen2-VL-2B-Instruct-GGUF" in message
    with pytest.raises(WeightsMissing) as caught:
        check_projector(layout.commercial_picker_mmproj)  # the seed's check
    message = str(caught.value)
    assert message.startswith(f"{layout.commercial_picker_mmproj.name}: clip.projector_type is "
                              "'qwen2vl_merger', not 'qwen2.5vl_merger'")
    assert str(layout.commercial_picker_mmproj) in message
    assert "ggml-org/Qwen2.5-VL-3B-Instruct-GGUF" in message


def clip_gguf(path: Path, values: dict[str, str | int | bool]) -> Path:
    """A `clip` GGUF holding only the given keys and no tensors."""
    writer = GGUFWriter(path, "clip")
    for key, value in values.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


QWEN2VL = {"clip.projector_type": "qwen2vl_merger"}


@pytest.mark.parametrize(("values", "reason"), [
    ({**QWEN2VL, "clip.vision.n_wa_pattern": 8},
     "clip.vision.n_wa_pattern is 8; llama.cpp would run window attention"),
    ({**QWEN2VL, "clip.use_silu": True}, "clip.use_silu is true: llama.cpp would run a SiLU MLP"),
    ({"clip.projector_type": "qwen3vl_merger"},
     "clip.projector_type is 'qwen3vl_merger', not 'qwen2vl_merger'; llama.cpp would run it"),
    ({}, "clip.projector_type is None"),
])
def test_commercial_check_refuses_qwen25_marks(tmp_path, values, reason):
    path = clip_gguf(tmp_path / "odd-mmproj.gguf", values)
    with pytest.raises(WeightsMissing) as caught:
        check_projector(path, profile="commercial")
    assert str(caught.value).startswith(f"odd-mmproj.gguf: {reason}")
    assert str(path) in str(caught.value)
    for good in (QWEN2VL, {**QWEN2VL, "clip.vision.n_wa_pattern": 0,
                           "clip.use_silu": False, "clip.use_gelu": True}):
        check_projector(clip_gguf(tmp_path / "good.gguf", good), profile="commercial")


def test_commercial_check_refuses_the_fork_era_qwen25_projector(tmp_path):
    """The fork-era Qwen2.5-VL file says `qwen2vl_merger` too: a research-licence encoder under
    Qwen2-VL's type, refused by its window-attention key."""
    fork = tmp_path / "mmproj-fork-era.gguf"
    write_fork_era_mmproj(fork)
    with pytest.raises(WeightsMissing, match="fork-era Qwen2.5-VL conversion labelled "
                                             "'qwen2vl_merger', not Qwen2-VL-2B-Instruct's"):
        check_projector(fork, profile="commercial")


# ------------------------------------------------------------------ errors name the files


def commercial_copy(tmp_path: Path, layout: Layout) -> Layout:
    copy = Layout(tmp_path / "weights")
    shutil.copytree(layout.commercial_picker_model.parent,
                    copy.commercial_picker_model.parent)
    return copy


def test_required_commercial_picker_names_its_files(tmp_path, layout, group_photo):
    wrong = commercial_copy(tmp_path, layout)
    shutil.copyfile(layout.picker_mmproj, wrong.commercial_picker_mmproj)  # the seed's encoder
    picker = FacePicker.load(wrong, profile="commercial", n_threads=2)
    try:
        assert picker.error.startswith("model load error: WeightsMissing: "
                                       f"{wrong.commercial_picker_mmproj.name}: ")
        result = picker.pick(group_photo, THREE_FACES, "the man on the left")
        assert result.index == 2 and "qwen2.5vl_merger" in result.picked_by
    finally:
        picker.close()
    with pytest.raises(WeightsMissing) as caught:
        FacePicker.load(wrong, profile="commercial", n_threads=2, required=True)
    message = str(caught.value)
    assert message.startswith("commercial profile's face picker model "
                              f"{wrong.commercial_picker_model} with projector "
                              f"{wrong.commercial_picker_mmproj} did not load")
    assert "'qwen2.5vl_merger', not 'qwen2vl_merger'" in message


@pytest.mark.parametrize("missing", ["model", "mmproj"])
def test_missing_commercial_file_is_named(tmp_path, layout, missing):
    partial = commercial_copy(tmp_path, layout)
    gone = (partial.commercial_picker_model if missing == "model"
            else partial.commercial_picker_mmproj)
    gone.unlink()
    with pytest.raises(WeightsMissing) as caught:
        FacePicker.load(partial, profile="commercial", n_threads=2, required=True)
    assert str(caught.value).count(str(gone)) >= 2  # in the pair and in the reason
