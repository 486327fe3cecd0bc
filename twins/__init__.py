"""Tiny twins: every production model, with random weights, in the production on-disk layout.

`write_tiny_weights(root)` (CLI: `python -m twins write DIR`) writes a complete weights
tree that the production loaders read unchanged, in seconds and without network: the two SDXL
single-file checkpoints and their config folder, the face models (InsightFace ONNX, YOLO, SAM;
OpenCV's YuNet and SFace), the identity models (CLIP ViT-H encoder, IP-Adapters, InstantID,
the fast preset's LoRA) and the picker's GGUF files, then the checkpoints' build-time conversion
(`converted/`). The images they make are noise; the code paths are the real ones.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.layout import Layout


def write_tiny_weights(root: Path, convert: bool = True) -> Layout:
    """Write every twin under `root`; returns the layout. The SDXL twins come first: the identity
    twins are sized on the SDXL twin's UNet config. `convert` then runs the build-time
    conversion (`pipeline.convert`), as the images do, so start-up takes the production path."""
    from twins.faces import write_face_twins
    from twins.identity import write_identity_twins
    from twins.opencv_faces import write_sface_twin, write_yunet_twin
    from twins.picker import write_picker_twins
    from twins.sdxl import write_sdxl_twins

    layout = Layout(Path(root))
    write_sdxl_twins(layout)
    write_face_twins(layout)
    write_yunet_twin(layout.yunet)
    write_sface_twin(layout.sface)
    write_identity_twins(layout)
    write_picker_twins(layout)
    if convert:
        from pipeline.convert import convert_weights

        convert_weights(layout.root)
    return layout
