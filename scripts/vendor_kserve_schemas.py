"""Vendor the parts of KServe's CRD schemas that `builder k8s --weights image-volume` renders into
tests/image/schemas/kserve-crds.json (what tests/image/test_k8s_weights.py validates the KServe pair against).

    python scripts/vendor_kserve_schemas.py KSERVE_GIT_DIR [REVISION]

reads config/crd/full/serving.kserve.io_{inferenceservices,servingruntimes}.yaml at REVISION (default HEAD) of
a kserve git directory (a bare one is fine) and keeps, of each served version's openAPIV3Schema, the fields on
the paths in KEEP in full and every other field as its type alone: each object on a kept path still lists all
its fields (a misspelt one fails), at a few kilobytes instead of KServe's 2 MB. Descriptions are dropped.
Rerun it when KServe is bumped or the templates use a field outside KEEP (the test says which).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "image" / "schemas" / "kserve-crds.json"
# kind -> (version, paths kept in full: dotted, `[]` for an array's items, a trailing `*` for a whole subtree)
KEEP = {
    "InferenceService": (
        "v1beta1",
        ["spec.predictor.model.modelFormat.*", "spec.predictor.model.runtime", "spec.predictor.model.storageUri"],
    ),
    "ServingRuntime": (
        "v1alpha1",
        [
            "spec.supportedModelFormats.[].*",
            "spec.containers.[].name",
            "spec.containers.[].image",
            "spec.containers.[].ports.[].*",
            "spec.containers.[].env.[].*",
            "spec.containers.[].resources.*",
            "spec.containers.[].securityContext.*",
        ],
    ),
}
FILES = {"InferenceService": "inferenceservices", "ServingRuntime": "servingruntimes"}
_SHALLOW = ("type", "format", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "anyOf")


def _tree(paths: list[str]) -> dict:
    tree: dict = {}
    for path in paths:
        node = tree
        for part in path.split("."):
            node = node.setdefault(part, {})
    return tree


def _strip(schema: dict) -> dict:
    """The schema without descriptions, whole."""
    out = {k: v for k, v in schema.items() if k != "description"}
    if "properties" in out:
        out["properties"] = {k: _strip(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _strip(out[key])
    return out


def prune(schema: dict, tree: dict) -> dict:
    if "*" in tree:
        return _strip(schema)
    out = {k: v for k, v in schema.items() if k not in ("description", "properties", "items")}
    if "properties" in schema:
        out["properties"] = {
            name: prune(sub, tree[name]) if name in tree else {k: sub[k] for k in _SHALLOW if k in sub}
            for name, sub in schema["properties"].items()
        }
    if "items" in schema:
        out["items"] = prune(schema["items"], tree["[]"]) if "[]" in tree else {}
    return out


def main(git_dir: str, revision: str = "HEAD") -> None:
    schemas = {}
    for kind, (version, paths) in KEEP.items():
        path = f"config/crd/full/serving.kserve.io_{FILES[kind]}.yaml"
        text = subprocess.run(["git", "-C", git_dir, "show", f"{revision}:{path}"], check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
        crd = yaml.safe_load(text)
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        schemas[kind] = {
            "apiVersion": f"{crd['spec']['group']}/{version}",
            "schema": prune(served["schema"]["openAPIV3Schema"], _tree(paths)),
        }
    commit = subprocess.run(["git", "-C", git_dir, "rev-parse", revision], check=True, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    described = subprocess.run(["git", "-C", git_dir, "describe", "--tags", revision], capture_output=True,
                               text=True).stdout.strip()  # fmt: skip
    doc = {
        "$comment": (
            f"KServe CRD schemas (github.com/kserve/kserve, Apache-2.0, Copyright The KServe Authors) at commit "
            f"{commit} ({described}; python/kserve 0.20.0), config/crd/full/serving.kserve.io_*.yaml, pruned by "
            "scripts/vendor_kserve_schemas.py: the fields the KServe pair renders are kept in full, the others "
            "as their type alone; descriptions dropped."
        ),
        "keep": {kind: paths for kind, (_, paths) in KEEP.items()},
        "kinds": schemas,
    }
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
