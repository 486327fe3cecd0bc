"""Character generation with optional face swap: the core behind the Cog and RunPod adapters.

Importing the package is cheap (no torch): `pipeline.schema` is read by `benchmark.py` with only
`requests` installed. The stages live in their own modules (generate, faces, identity, picker,
output, weights) and `pipeline.service` wires them together.
"""
