"""Cut the part of Square's published OpenAPI description this project uses.

Usage: python tools/vendor_square_openapi.py ../shared/square-openapi/api.json

Writes services/emulator/openapi/square-openapi-subset.json: the operations below and every schema
they reach, unchanged. Square's Apache-2.0 licence is copied beside it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

OPERATIONS = {
    ("/v2/locations", "get"),
    ("/v2/merchants", "get"),
    ("/v2/merchants/{merchant_id}", "get"),
    ("/oauth2/token/status", "post"),
    ("/v2/orders", "post"),
    ("/v2/orders/{order_id}", "get"),
    ("/v2/orders/{order_id}", "put"),
    ("/v2/orders/batch-retrieve", "post"),
    ("/v2/orders/calculate", "post"),
    ("/v2/orders/search", "post"),
    ("/v2/orders/{order_id}/pay", "post"),
    ("/v2/payments", "post"),
    ("/v2/payments/{payment_id}", "get"),
    ("/v2/payments/{payment_id}/complete", "post"),
    ("/v2/refunds", "post"),
    ("/v2/payments", "get"),
    ("/v2/payments/cancel", "post"),
    ("/v2/payments/{payment_id}/cancel", "post"),
    ("/v2/refunds", "get"),
    ("/v2/refunds/{refund_id}", "get"),
}

OUT = Path(__file__).resolve().parents[1] / "services" / "emulator" / "openapi"


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def main(source: str) -> None:
    spec = json.loads(Path(source).read_text())
    paths: dict[str, dict[str, Any]] = {}
    for path, method in sorted(OPERATIONS):
        paths.setdefault(path, {})[method] = spec["paths"][path][method]
    wanted: set[str] = set()
    _refs(paths, wanted)
    schemas = spec["components"]["schemas"]
    done: set[str] = set()
    while wanted - done:
        name = sorted(wanted - done)[0]
        done.add(name)
        _refs(schemas[name], wanted)
    subset = {
        "openapi": spec["openapi"],
        "info": spec["info"],
        "x-vendored-from": "square/connect-api-specification api.json (Apache-2.0), cut by "
        "tools/vendor_square_openapi.py",
        "paths": paths,
        "components": {"schemas": {name: schemas[name] for name in sorted(done)}},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "square-openapi-subset.json").write_text(json.dumps(subset, indent=1, sort_keys=True))
    shutil.copy(Path(source).parent / "LICENSE.txt", OUT / "LICENSE.txt")
    print(f"{len(paths)} paths, {len(done)} schemas -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/square-openapi/api.json")
