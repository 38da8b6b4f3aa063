"""Offline schema validation of Kubernetes manifests (test helpers).

- Custom resources with a vendored CRD (the RayService, `data/ray.io_rayservices.yaml`): the CRD's
  ``openAPIV3Schema`` converted to JSON Schema and checked with `jsonschema`.  The conversion is
  strict the way ``kubectl apply`` (server-side field validation ``Strict``, the default) is:
  an unknown field is an error (``additionalProperties: false`` on every object schema with
  ``properties``, unless ``x-kubernetes-preserve-unknown-fields``).  It also maps
  ``x-kubernetes-int-or-string``, ``nullable`` and the ``int32``/``int64`` formats (ranges), and
  checks what JSON Schema cannot say: items of ``x-kubernetes-list-type: map`` lists unique by
  their ``x-kubernetes-list-map-keys`` (containers by name, ports by port and protocol, env by
  name) and of ``set`` lists unique.  The CRD's CEL rules (``x-kubernetes-validations``) are only
  immutability checks and the allowed ``managedBy`` values; the latter is checked by hand.
- Core objects (Secret, PersistentVolumeClaim, Job, and the pod templates inside the RayService):
  the Kubernetes JSON schemas that the ``kubernetes-validate`` package ships (offline, strict).
- Objects of CRDs with no offline schema (the Prometheus Operator's PodMonitor): a hand-written
  structural schema of the fields these manifests use (strict at those levels).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DATA = Path(__file__).parent / "data"
RAYSERVICE_CRD = DATA / "ray.io_rayservices.yaml"
RAYSERVICE_CRD_SHA256 = "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab"
K8S_VERSION = "1.33"   # the Kubernetes API version core objects are checked against
INT32 = (-(2 ** 31), 2 ** 31 - 1)
INT64 = (-(2 ** 63), 2 ** 63 - 1)
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DROP = {"description", "default", "example", "externalDocs", "nullable", "format"}


# ------------------------------------------------------------------------------ CRD -> JSON Schema

def openapi_to_jsonschema(node: Any) -> Any:
    """A (structural) OpenAPI v3 schema of a CRD as a JSON Schema (draft 2020-12), strict."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = openapi_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [openapi_to_jsonschema(sub) for sub in value]
        elif key.startswith("x-kubernetes-") or key in _DROP:
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    fmt = node.get("format")
    if node.get("type") == "integer" and fmt in ("int32", "int64"):
        lo, hi = INT32 if fmt == "int32" else INT64
        out.setdefault("minimum", lo)
        out.setdefault("maximum", hi)
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if node.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def rayservice_crd() -> dict[str, Any]:
    return yaml.safe_load(RAYSERVICE_CRD.read_text(encoding="utf-8"))


def crd_sha256() -> str:
    return hashlib.sha256(RAYSERVICE_CRD.read_bytes()).hexdigest()


def crd_openapi(crd: dict[str, Any], version: str) -> dict[str, Any]:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")


@functools.cache
def _crd_validator(version: str) -> jsonschema.protocols.Validator:
    schema = openapi_to_jsonschema(crd_openapi(rayservice_crd(), version))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def list_map_errors(schema: Any, data: Any, path: str = "") -> list[str]:
    """Duplicate keys in ``x-kubernetes-list-type: map`` lists and duplicates in ``set`` lists."""
    errors: list[str] = []
    if not isinstance(schema, dict):
        return errors
    if isinstance(data, list):
        kind = schema.get("x-kubernetes-list-type")
        if kind == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen: dict[tuple, int] = {}
            for i, item in enumerate(data):
                if isinstance(item, dict):
                    k = tuple(json.dumps(item.get(name), sort_keys=True) for name in keys)
                    if k in seen:
                        errors.append(f"{path}[{i}]: duplicate {'/'.join(keys)} {k} (also item {seen[k]})")
                    seen.setdefault(k, i)
        elif kind == "set":
            dumped = [json.dumps(item, sort_keys=True) for item in data]
            if len(set(dumped)) != len(dumped):
                errors.append(f"{path}: duplicate items in a set list")
        for i, item in enumerate(data):
            errors += list_map_errors(schema.get("items"), item, f"{path}[{i}]")
    elif isinstance(data, dict):
        props = schema.get("properties", {})
        for key, value in data.items():
            sub = props.get(key, schema.get("additionalProperties"))
            errors += list_map_errors(sub, value, f"{path}.{key}" if path else key)
    return errors


def validate_with_crd(obj: dict[str, Any]) -> list[str]:
    """Problems of a ray.io RayService against the vendored CRD (empty: valid)."""
    crd = rayservice_crd()
    group, _, version = obj.get("apiVersion", "").partition("/")
    if group != crd["spec"]["group"] or obj.get("kind") != crd["spec"]["names"]["kind"]:
        return [f"not a {crd['spec']['names']['kind']} of {crd['spec']['group']}: "
                f"{obj.get('apiVersion')} {obj.get('kind')}"]
    served = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
    if version not in served:
        return [f"version {version} is not served (served: {served})"]
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in _crd_validator(version).iter_errors(obj)]
    errors += list_map_errors(crd_openapi(crd, version), obj)
    allowed_managers = ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")
    for where in (obj.get("spec", {}), obj.get("spec", {}).get("rayClusterConfig", {})):
        if "managedBy" in where and where["managedBy"] not in allowed_managers:
            errors.append(f"managedBy must be one of {allowed_managers}")
    errors += metadata_errors(obj)
    return errors


def metadata_errors(obj: dict[str, Any]) -> list[str]:
    """ObjectMeta against the core schema, and the name as a DNS-1123 subdomain."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        return ["metadata.name is required"]
    errors = [f"metadata.{e}" for e in core_definition_errors("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", meta)]
    name = meta["name"]
    if len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
    return errors


# ------------------------------------------------------------------- core schemas (offline)

def _core_dir() -> Path:
    import kubernetes_validate

    return Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"


@functools.cache
def _core_registry():
    from referencing import Registry, Resource

    defs = json.loads((_core_dir() / "_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry(), defs["$id"]


def validate_core(obj: dict[str, Any]) -> list[str]:
    """Problems of a core Kubernetes object (Secret, PVC, Job, ...) against the strict schemas
    kubernetes-validate ships for `K8S_VERSION` (empty: valid)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    return metadata_errors(obj)


def core_definition_errors(definition: str, data: Any) -> list[str]:
    """Problems of ``data`` as the core type ``definition`` (e.g. io.k8s.api.core.v1.PodTemplateSpec)."""
    registry, defs_id = _core_registry()
    validator = jsonschema.Draft202012Validator({"$ref": f"{defs_id}#/$defs/{definition}"}, registry=registry)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(data)]


# ------------------------------------------------------------- CRDs with no offline schema

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _LABELS,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
# The PodMonitor fields these manifests use (monitoring.coreos.com/v1, Prometheus Operator),
# written from its API reference: strict where the manifests go, open elsewhere.
PODMONITOR_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "anyOf": [{"required": ["port"]}, {"required": ["portNumber"]}],
                    "properties": {
                        "port": {"type": "string", "minLength": 1},
                        "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "honorLabels": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": {"type": "object"}},
                        "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                    },
                }},
            },
        },
    },
}


def validate_podmonitor(obj: dict[str, Any]) -> list[str]:
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in jsonschema.Draft202012Validator(PODMONITOR_SCHEMA).iter_errors(obj)]
    return errors + metadata_errors(obj)


def validate_any(obj: dict[str, Any]) -> list[str]:
    """Dispatch on apiVersion/kind."""
    if obj.get("apiVersion", "").startswith("ray.io/"):
        return validate_with_crd(obj)
    if obj.get("apiVersion") == "monitoring.coreos.com/v1" and obj.get("kind") == "PodMonitor":
        return validate_podmonitor(obj)
    return validate_core(obj)
