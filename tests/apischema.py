"""Request schemas for the cloud fakes, read from the services' published machine-readable descriptions.

Two sources, each turned into the small JSON-schema subset :func:`tests.restfake.check` reads
(``type``, closed ``properties``, ``required``, ``additional``, ``items``, ``enum``, ``pattern``):

- Google: the **discovery documents** that google-api-python-client ships
  (``googleapiclient/discovery_cache/documents/{compute.v1,iam.v1,cloudresourcemanager.v1,
  storage.v1,cloudbilling.v1}.json``: what Google publishes at
  ``https://{service}.googleapis.com/$discovery/rest``, and what google-cloud-compute is generated
  from). :func:`discovery_schema` follows ``$ref`` (cycles are shared dicts, not copies), maps
  ``string``/``int64`` (Google's JSON carries int64 as a string) and ``integer``/``int32``, enums,
  ``additionalProperties``, and the per-method ``annotations.required``.
- Azure: the models that **autorest / TypeSpec generated from the OpenAPI specs**
  (azure-rest-api-specs) in azure-mgmt-compute (``model_base`` models: each field's REST name,
  type hints and visibility) and azure-mgmt-authorization (msrest models: ``_attribute_map`` and
  ``_validation``, with ``properties.*`` flattening). :func:`azure_schema` rebuilds the REST body's
  schema from them: closed objects, extensible enums as their known values, required fields.

Objects are closed, as the real APIs are for the fields they know: an unknown field or a wrong
type is a 400 (Google: ``Invalid JSON payload received. Unknown name``; ARM: the request model's
validation), which the fakes answer.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import json
import sys
import typing
from pathlib import Path
from typing import Any

Schema = dict[str, Any]


@functools.cache
def discovery_document(name: str) -> dict[str, Any]:
    """One of the discovery documents google-api-python-client carries (``compute.v1``, ``iam.v1``, ...)."""
    spec = importlib.util.find_spec("googleapiclient")
    if spec is None or spec.origin is None:
        raise RuntimeError("google-api-python-client is not installed: `pip install -e .[dev]` (the fakes' schemas)")
    path = Path(spec.origin).parent / "discovery_cache" / "documents" / f"{name}.json"
    return dict(json.loads(path.read_text()))


def discovery_schema(document: str, name: str, method: str | None = None) -> Schema:
    """The schema ``name`` of a discovery document; ``method`` (e.g. ``compute.instanceTemplates.insert``)
    adds the fields its ``annotations.required`` lists."""
    doc = discovery_document(document)
    memo: dict[str, Schema] = {}
    return _discovery(doc["schemas"], doc["schemas"][name], memo, method)


def _discovery(schemas: dict[str, Any], src: dict[str, Any], memo: dict[str, Schema], method: str | None) -> Schema:
    ref = src.get("$ref")
    if ref is not None:
        if ref not in memo:
            memo[ref] = {}  # filled in place: a recursive schema points back at this dict
            memo[ref].update(_discovery(schemas, schemas[ref], memo, method))
        return memo[ref]
    kind, fmt = src.get("type"), src.get("format")
    out: Schema = {}
    if kind == "string" and fmt in ("int64", "uint64"):
        out["type"] = "int64"
    elif kind in ("string", "boolean", "integer", "number", "array", "object"):
        out["type"] = kind
    if "enum" in src:
        out["enum"] = list(src["enum"])
    if "pattern" in src and kind == "string":
        out["pattern"] = src["pattern"]
    if kind == "array" and "items" in src:
        out["items"] = _discovery(schemas, src["items"], memo, method)
    if kind == "object":
        if "properties" in src:
            props = src["properties"]
            out["properties"] = {k: _discovery(schemas, v, memo, method) for k, v in props.items()}
            if method is not None:
                out["required"] = [
                    k for k, v in props.items() if method in v.get("annotations", {}).get("required", ())
                ]
        elif "additionalProperties" in src:
            out["additional"] = _discovery(schemas, src["additionalProperties"], memo, method)
    return out


_SCALARS: dict[Any, str] = {str: "string", bool: "boolean", int: "integer", float: "number"}


def azure_schema(model: type) -> Schema:
    """The REST body schema of an azure-mgmt-* request model (a ``model_base`` or an msrest model)."""
    return _azure_model(model, {})


def _azure_model(model: type, memo: dict[type, Schema]) -> Schema:
    if model in memo:
        return memo[model]
    out: Schema = {"type": "object", "properties": {}, "required": []}
    memo[model] = out
    if hasattr(model, "_attribute_map"):  # msrest (azure-mgmt-authorization): keys like properties.roleDefinitionId
        validation = getattr(model, "_validation", {})
        for attr, info in model._attribute_map.items():
            path = [p.replace("\\.", ".") for p in info["key"].replace("\\.", "\0").split(".")]
            path = [p.replace("\0", ".") for p in path]
            leaf = _msrest_type(info["type"], sys.modules[model.__module__], memo)
            node = out
            for part in path[:-1]:
                node = node["properties"].setdefault(part, {"type": "object", "properties": {}, "required": []})
            node["properties"][path[-1]] = leaf
            if validation.get(attr, {}).get("required"):
                node["required"].append(path[-1])
        return out
    model()  # model_base computes the class's REST names on the first instance
    fields = model._attr_to_rest_field  # type: ignore[attr-defined]
    module = sys.modules[model.__module__]
    package = sys.modules[module.__name__.rsplit(".", 1)[0]]
    hints = typing.get_type_hints(model, {**vars(module), "_models": package})
    for attr, field in fields.items():
        hint = hints.get(attr, Any)
        optional = type(None) in typing.get_args(hint)
        out["properties"][field._rest_name] = _azure_hint(hint, memo)
        if not optional and hint is not Any and (field._visibility or ["create"]) != ["read"]:
            out["required"].append(field._rest_name)
    return out


def _azure_hint(hint: Any, memo: dict[type, Schema]) -> Schema:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:  # an extensible enum: Union[str, TheEnum]
            return {"type": "string", "enum": [m.value for e in enums for m in e]}
        return _azure_hint(args[0], memo) if len(args) == 1 else {}
    if origin is list:
        return {"type": "array", "items": _azure_hint(args[0], memo)}
    if origin is dict:
        return {"type": "object", "additional": _azure_hint(args[1], memo)}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"type": "string", "enum": [m.value for m in hint]}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if isinstance(hint, type) and getattr(hint, "_is_model", False):
        return _azure_model(hint, memo)
    return {}  # datetime, Any: not checked


def _msrest_type(name: str, module: Any, memo: dict[type, Schema]) -> Schema:
    if name.startswith("[") and name.endswith("]"):
        return {"type": "array", "items": _msrest_type(name[1:-1], module, memo)}
    if name.startswith("{") and name.endswith("}"):
        return {"type": "object", "additional": _msrest_type(name[1:-1], module, memo)}
    scalars = {"str": "string", "bool": "boolean", "int": "integer", "long": "integer", "float": "number"}
    if name in scalars:
        return {"type": scalars[name]}
    cls = getattr(module, name, None)
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        return {"type": "string", "enum": [m.value for m in cls]}
    if isinstance(cls, type):
        return _azure_model(cls, memo)
    return {}  # iso-8601, object: not checked
