"""One reference through the one face-swap path answers as the two-path code did (issue 20).

`tests/golden/one_reference.json` holds RunPod responses to one-reference jobs (`image_url`
and a one-entry `identities`, scenes with and without a face), written by
`python -m tests.golden_responses`, timings dropped and each image as its sha256. The same jobs
through today's handler must give the same responses, key for key and byte for byte, images
included. History of the file (each rewrite an intended change, said in its commit):
- written on the code before the merge (668b81f); the merged path (98e7a34) matched it;
- 9e55409: the twins' real CLIP tokenizers change every twin image (applied/reason unchanged);
- 192cc57: responses report `cfg` (2.0 for these quality jobs); nothing else changed.
"""

from __future__ import annotations

import json

from tests.golden_responses import PINNED, cases, responses


def test_one_reference_responses_match_the_pinned_ones(worker):
    pinned = json.loads(PINNED.read_text())
    assert set(pinned) == set(cases())
    # The pins hold both outcomes, or they would not guard the merge.
    outcomes = {answer["face_swap"]["applied"] for answer in pinned.values()}
    assert outcomes == {True, False}
    assert responses(worker) == pinned
