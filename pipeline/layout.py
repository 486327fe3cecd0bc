"""Where every model file lives under the weights folder (``WEIGHTS_DIR``).

One table shared by ``weights.lock`` (its ``target`` folders), the tiny-twin writers and the
production loaders, so the three can never disagree about a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import WeightsMissing

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Both images (cog build and Dockerfile.runpod) put the project in /src and bake the weights
# into /src/weights, so the default is the project's own weights/ folder.
DEFAULT_WEIGHTS_DIR = PROJECT_ROOT / "weights"


@dataclass(frozen=True)
class Layout:
    """Paths of every model file under one weights root."""

    root: Path

    # SDXL: one diffusers config folder (configs + tokenizers, no weights) used to read both
    # single-file checkpoints offline.
    @property
    def sdxl_config(self) -> Path:
        return self.root / "sdxl-base-config"

    @property
    def cyberrealistic(self) -> Path:
        return self.root / "cyberrealistic-xl" / "CyberRealisticXLPlay_V7.0_FP16.safetensors"

    @property
    def juggernaut(self) -> Path:
        return self.root / "juggernaut-xi" / "Juggernaut-XI-byRunDiffusion.safetensors"

    # CLIP ViT-H-14 vision tower in transformers format (config.json + model.safetensors).
    @property
    def image_encoder(self) -> Path:
        return self.root / "ip-adapter" / "models" / "image_encoder"

    @property
    def ip_adapter_dir(self) -> Path:
        return self.root / "ip-adapter"

    @property
    def ip_adapter_plus_face(self) -> Path:
        return self.ip_adapter_dir / "sdxl_models" / "ip-adapter-plus-face_sdxl_vit-h.safetensors"

    @property
    def faceid_dir(self) -> Path:
        return self.root / "ip-adapter-faceid"

    @property
    def faceid_plusv2(self) -> Path:
        return self.faceid_dir / "ip-adapter-faceid-plusv2_sdxl.bin"

    @property
    def instantid_dir(self) -> Path:
        return self.root / "instantid"

    @property
    def instantid_controlnet(self) -> Path:
        return self.instantid_dir / "ControlNetModel"

    @property
    def instantid_adapter(self) -> Path:
        return self.instantid_dir / "ip-adapter.bin"

    # The fast preset's few-step LoRA (ByteDance Hyper-SD, pipeline.presets).
    @property
    def fast_lora(self) -> Path:
        return self.root / "hyper-sd" / "Hyper-SDXL-8steps-CFG-lora.safetensors"

    @property
    def sam_vit_b(self) -> Path:
        return self.root / "sam" / "sam_vit_b_01ec64.pth"

    # insightface's FaceAnalysis(name=..., root=insightface_root) reads <root>/models/<name>/.
    @property
    def insightface_root(self) -> Path:
        return self.root / "insightface"

    @property
    def antelopev2(self) -> Path:
        return self.insightface_root / "models" / "antelopev2"

    @property
    def buffalo_l(self) -> Path:
        return self.insightface_root / "models" / "buffalo_l"

    @property
    def yolo_face(self) -> Path:
        return self.root / "adetailer" / "face_yolov8m.pt"

    # The face picker's matched pair, both from ggml-org/Qwen2.5-VL-3B-Instruct-GGUF (one
    # conversion lineage: the projector is llama.cpp's `qwen2.5vl_merger`, docs/picker.md).
    @property
    def picker_model(self) -> Path:
        return self.root / "qwen25-vl" / "Qwen2.5-VL-3B-Instruct-Q4_K_M.gguf"

    @property
    def picker_mmproj(self) -> Path:
        return self.root / "qwen25-vl" / "mmproj-Qwen2.5-VL-3B-Instruct-f16.gguf"

    # The commercial profile's face models: OpenCV model zoo's YuNet (detection, MIT) and SFace
    # (recognition, Apache-2.0), read by cv2.FaceDetectorYN / cv2.FaceRecognizerSF.
    @property
    def yunet(self) -> Path:
        return self.root / "opencv" / "face_detection_yunet_2023mar.onnx"

    @property
    def sface(self) -> Path:
        return self.root / "opencv" / "face_recognition_sface_2021dec.onnx"

    # The commercial profile's picker pair, both from ggml-org/Qwen2-VL-2B-Instruct-GGUF
    # (Apache-2.0; llama.cpp's `qwen2vl_merger` projector).
    @property
    def commercial_picker_model(self) -> Path:
        return self.root / "qwen2-vl" / "Qwen2-VL-2B-Instruct-Q4_K_M.gguf"

    @property
    def commercial_picker_mmproj(self) -> Path:
        return self.root / "qwen2-vl" / "mmproj-Qwen2-VL-2B-Instruct-f16.gguf"

    @property
    def warm_up_reference(self) -> Path:
        """A face photo the start-up warm-up swaps, when the weights tree brings its own (the
        tiny twins' marker face); otherwise the portrait bundled with the code is used."""
        return self.root / "warm-up" / "reference.png"

    def text_files(self) -> list[Path]:
        """What text mode loads."""
        return [self.sdxl_config / "model_index.json", self.cyberrealistic]

    def check_present(self, paths: list[Path]) -> None:
        """Raise WeightsMissing naming every absent file (sizes and digests are checked when
        the weights are fetched; this is the cheap check a cold start can afford)."""
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise WeightsMissing(
                f"{len(missing)} model file(s) missing under {self.root}: {', '.join(missing)}. "
                "Run `python -m pipeline.weights fetch` (real weights) or "
                "`python -m twins write` (tiny twins) into WEIGHTS_DIR.")
