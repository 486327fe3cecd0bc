"""Write `.cog/openapi_schema.json` from the predictor, as `cog build` would.

The local Cog server (`python -m cog.server.http`) validates inputs only when this file exists;
a built image always has it. Run from the project root: `python scripts/write_cog_schema.py`.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def input_schema(module: str = "predict", name: str = "Predictor") -> tuple[dict, dict, dict]:
    """(Input schema, enum schemas for inputs with choices, Output schema) of the predictor."""
    from cog._inspector import create_predictor

    from pipeline.cog_inputs import COG_FIELDS

    specs = {spec.cog_key: spec for spec in COG_FIELDS}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # cog 0.23 prefers run()
        info = create_predictor(module, name)
    properties: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    required: list[str] = []
    for field in sorted(info.inputs.values(), key=lambda f: f.order):
        prop: dict[str, Any] = {"title": field.name.replace("_", " ").title(),
                                "x-order": field.order}
        if field.choices is not None:
            enums[field.name] = {"title": field.name, "description": "An enumeration.",
                                 "enum": field.choices, **field.type.primitive.json_type()}
            prop["allOf"] = [{"$ref": f"#/components/schemas/{field.name}"}]
        else:
            prop.update(field.type.json_type())
        for key, value in (("description", field.description), ("minimum", field.ge),
                           ("maximum", field.le), ("minLength", field.min_length),
                           ("maxLength", field.max_length), ("pattern", field.regex)):
            if value is not None:
                prop[key] = value
        spec = specs.get(field.name)
        if spec is not None:
            # cog's inspector turns bounds into floats; 2**63 - 1 does not survive that.
            for key, value in (("minimum", spec.ge), ("maximum", spec.le),
                               ("multipleOf", spec.multiple_of)):
                if value is not None:
                    prop[key] = value
        if field.default is not None:
            prop["default"] = field.type.json_encode(field.default)
        elif field.type.repetition.name.startswith("OPTIONAL"):
            prop["nullable"] = True
        else:
            required.append(field.name)
        properties[field.name] = prop
    inputs = {"title": "Input", "type": "object", "properties": properties}
    if required:
        inputs["required"] = required
    return inputs, enums, info.output.json_type()


def openapi_document() -> dict:
    inputs, enums, output = input_schema()
    request = {"title": "PredictionRequest", "type": "object",
               "properties": {"id": {"title": "Id", "type": "string"},
                              "input": {"$ref": "#/components/schemas/Input"}}}
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {"/predictions": {"post": {
            "summary": "Predict",
            "operationId": "predict_predictions_post",
            "requestBody": {"content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/PredictionRequest"}}}},
            "responses": {"200": {"description": "Successful Response"}}}}},
        "components": {"schemas": {"Input": inputs, "Output": output,
                                   "PredictionRequest": request, **enums}},
    }


def main() -> int:
    sys.path.insert(0, str(ROOT))
    target = ROOT / ".cog" / "openapi_schema.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(openapi_document(), indent=2) + "\n")
    print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
