"""The one JSON Schema for DTSetup input (INI and YAML alike), applied after typing.

The schema lives here as data so that it ships inside the wheel; the published copy
``schemas/dtsetup.schema.json`` is generated from it (``python -m dtsetup.schema``) and a
unit test keeps the two identical. ``jsonschema`` is imported lazily: it costs ~74 ms at
start-up (reference/baselines.md) and only validation needs it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["KEYS", "SCHEMA", "SECRET_KEYS", "SchemaIssue", "dump", "iter_issues"]

# The keys a section may hold, in the order of the seed's sample [L566-584]; export writes
# keys in this order (dtsetup.model.KEYS).
KEYS: tuple[str, ...] = (
    "DTSETUPTYPE",
    "DTACTIVATIONCODE",
    "DOUBLETAKEFOLDER",
    "QMEMORYBUFFERMAX",
    "DISKQUEUEFOLDER",
    "DISKQUEUEMAXSIZE",
    "DISKFREESPACEMIN",
    "DTSERVICESTARTUP",
    "PORT",
    "SET_FWPORT",
)

_PATH: dict[str, Any] = {
    "type": "string",
    "description": "absolute POSIX path with at least one component, no '..'",
    "pattern": "^/[^\u0000\n]*[^/\u0000\n][^\u0000\n]*$",
    "not": {"pattern": "(^|/)\\.\\.(/|$)"},
}
_YN: dict[str, Any] = {"type": "boolean", "description": "Y or 1 = yes, N or 0 = no"}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://dtake.invalid/schemas/dtsetup.schema.json",
    "title": "dtsetup input (DTSetup.ini or YAML), after typing",
    "description": (
        "Top-level keys are section names: Config (any host without its own section) or a "
        "machine name (case-sensitive). Keys are upper-cased before validation. Values are "
        "typed first: integers, booleans (Y/1/N/0), DTACTIVATIONCODE as a list split on ';'."
    ),
    "type": "object",
    "minProperties": 1,
    "propertyNames": {"minLength": 1},
    "additionalProperties": {"$ref": "#/$defs/section"},
    "$defs": {
        "path": _PATH,
        "yn": _YN,
        "section": {
            "type": "object",
            "propertyNames": {"enum": list(KEYS)},
            "properties": {
                "DTSETUPTYPE": {
                    "description": "DTNT server+client, DTSO server only, DTCO client only",
                    "enum": ["DTNT", "DTSO", "DTCO"],
                },
                "DTACTIVATIONCODE": {
                    "description": "24-character alphanumeric codes, several separated by ';'",
                    "x-secret": True,
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "string", "pattern": "^[A-Za-z0-9]{24}$"},
                },
                "DOUBLETAKEFOLDER": {"$ref": "#/$defs/path"},
                "QMEMORYBUFFERMAX": {"type": "integer", "minimum": 1},
                "DISKQUEUEFOLDER": {"$ref": "#/$defs/path"},
                "DISKQUEUEMAXSIZE": {
                    "anyOf": [{"type": "integer", "minimum": 0}, {"const": "UNLIMITED"}]
                },
                "DISKFREESPACEMIN": {"type": "integer", "minimum": 0},
                "DTSERVICESTARTUP": {"$ref": "#/$defs/yn"},
                "PORT": {"type": "integer", "minimum": 1024, "maximum": 65535},
                "SET_FWPORT": {"$ref": "#/$defs/yn"},
            },
            # A client-only install needs no licence; every other type does [seed §2.1].
            "if": {
                "properties": {"DTSETUPTYPE": {"const": "DTCO"}},
                "required": ["DTSETUPTYPE"],
            },
            "else": {"required": ["DTACTIVATIONCODE"]},
        },
    },
}

SECRET_KEYS: frozenset[str] = frozenset(
    key for key, spec in SCHEMA["$defs"]["section"]["properties"].items() if spec.get("x-secret")
)


@dataclass(frozen=True, slots=True)
class SchemaIssue:
    """A schema violation located by section and key (key None = the section itself)."""

    kind: str  # "unknown_key" | "required" | "value" | "document"
    section: str | None
    key: str | None
    message: str


def iter_issues(instance: dict[str, Any]) -> Iterator[SchemaIssue]:
    import jsonschema  # lazy: start-up time

    validator = jsonschema.Draft202012Validator(SCHEMA)
    for err in validator.iter_errors(instance):
        path = list(err.absolute_path)
        section = str(path[0]) if path else None
        if "propertyNames" in err.schema_path and len(path) == 1:
            yield SchemaIssue("unknown_key", section, str(err.instance), "unknown key")
        elif err.validator == "required":
            missing = [k for k in err.validator_value if k not in err.instance]
            for key in missing:
                yield SchemaIssue("required", section, key, f"{key} is required")
        elif len(path) >= 2:
            # Never echo err.message: it quotes the value, which may be a secret.
            yield SchemaIssue("value", section, str(path[1]), str(err.validator))
        else:
            yield SchemaIssue("document", section, None, str(err.validator))


def dump() -> str:
    return json.dumps(SCHEMA, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":  # pragma: no cover - regenerates schemas/dtsetup.schema.json
    print(dump(), end="")
