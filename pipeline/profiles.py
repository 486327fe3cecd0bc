"""Model profiles: which set of model files a worker loads, chosen once at start-up.

- `seed` (the default): the deployed system's stack, unchanged (CyberRealistic XL, IP-Adapter
  FaceID Plus v2 + Plus Face, InstantID refinement on Juggernaut XI, InsightFace antelopev2 +
  buffalo_l, YOLOv8m-face, SAM, Qwen2.5-VL-3B). Several of its files are non-commercial.
- `commercial`: only files whose licences allow a paid API: CyberRealistic XL with IP-Adapter
  Plus Face (CLIP ViT-H), a SAM-masked inpaint refine on the same checkpoint, OpenCV's YuNet
  (detection) and SFace (similarity), and an Apache-2.0 vision-language picker.

`weights.lock` says which profiles use each file (`profiles`) and whether its licence allows
commercial use (`commercial`); `python -m pipeline.weights licences` prints the table.
Standard library only: the weights CLI and the settings import it.
"""

from __future__ import annotations

SEED = "seed"
COMMERCIAL = "commercial"
PROFILES = (SEED, COMMERCIAL)
DEFAULT_PROFILE = SEED

# The model that scores identity in each profile's responses (`similarity_model`).
SIMILARITY_MODEL = {SEED: "buffalo_l", COMMERCIAL: "sface"}
