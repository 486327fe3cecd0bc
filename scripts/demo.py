"""The README's first command ends here: tiny twins, the real Cog server, one text prediction.

Writes the tiny-twin weights into `.tiny-weights/`, starts `python -m cog.server.http` on
loopback, sends `POST /predictions` with a prompt and the default size, and saves the PNG under
`outputs/`. The twins have random weights, so the image is noise; every code path is real.
"""

from __future__ import annotations

import base64
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.local_servers import CogServer
from twins import write_tiny_weights

PROMPT = "a confident woman in a business suit, professional lighting"


def main() -> int:
    weights = ROOT / ".tiny-weights"
    started = time.perf_counter()
    write_tiny_weights(weights)
    print(f"tiny twins written to {weights} in {time.perf_counter() - started:.1f} s")
    server = CogServer(ROOT, weights, Path(tempfile.mkdtemp(prefix="demo-cog-")))
    started = time.perf_counter()
    server.start()
    print(f"Cog server ready at {server.url} in {time.perf_counter() - started:.1f} s")
    try:
        started = time.perf_counter()
        response = server.predict({"prompt": PROMPT, "seed": 42})
        body = response.json()
        if body.get("status") != "succeeded":
            print(f"prediction failed: {body.get('error')}", file=sys.stderr)
            return 1
        output = body["output"]
        data = base64.b64decode(output["image"].split(",", 1)[1])
        target = ROOT / "outputs" / "demo.png"
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(data)
        print(f"POST /predictions -> {output['width']}x{output['height']}, seed {output['seed']}, "
              f"mode {output['mode']}, {time.perf_counter() - started:.1f} s")
        print(f"PNG written to {target}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
