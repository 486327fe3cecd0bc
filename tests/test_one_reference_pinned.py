"""Seed-profile responses answer as earlier code did (issues 20 and 23).

`tests/golden/one_reference.json` holds RunPod responses to one-reference jobs (`image_url`
and a one-entry `identities`, scenes with and without a face) and to text jobs (quality and
fast), written by `python -m tests.golden_responses`, timings dropped and each image as its
sha256. The same jobs through today's handler must give the same responses, key for key and
byte for byte, images included, plus only the keys issue 23 added (`profile: "seed"` and
`face_swap.similarity_model: "buffalo_l"`). History of the file (each rewrite an intended
change, said in its commit):
- written on the code before the merge (668b81f); the merged path (98e7a34) matched it;
- 9e55409: the twins' real CLIP tokenizers change every twin image (applied/reason unchanged);
- 192cc57: responses report `cfg` (2.0 for these quality jobs); nothing else changed;
- issue 23: two text jobs added, pinned on the code before the profiles (97f35d0).
"""

from __future__ import annotations

import copy
import json

from tests.golden_responses import PINNED, cases, responses


def without_profile_keys(answer: dict) -> dict:
    """`answer` less the keys the profiles added, after checking their seed values."""
    answer = copy.deepcopy(answer)
    if answer.get("status") == "success":
        assert answer.pop("profile") == "seed"
        if "face_swap" in answer:
            assert answer["face_swap"].pop("similarity_model") == "buffalo_l"
    return answer


def test_seed_profile_responses_match_the_pinned_ones(worker):
    pinned = json.loads(PINNED.read_text())
    assert set(pinned) == set(cases())
    # The pins hold both outcomes and both modes, or they would not guard the changes.
    swaps = [answer for answer in pinned.values() if "face_swap" in answer]
    assert {answer["face_swap"]["applied"] for answer in swaps} == {True, False}
    assert {answer["mode"] for answer in pinned.values()} == {"text", "face_swap"}
    assert {answer.get("preset") for answer in pinned.values()} == {"quality", "fast"}
    now = responses(worker)
    assert {name: without_profile_keys(answer) for name, answer in now.items()} == pinned
