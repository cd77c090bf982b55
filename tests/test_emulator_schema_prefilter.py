"""The emulator's fast request-shape prefilter may only ever be stricter than the OpenAPI check.

`check_request_shape` returns early when the Rust Draft 4 prefilter passes a body; the OpenAPI
3.0 validator decides everything else. So the emulator stays as strict as Square's published
schema only if every body the prefilter passes is one the OpenAPI validator passes. Bodies are
generated from the schema itself (each property present or not, of its type or of another,
strings around their length bounds, enum values and near misses, nulls, unknown fields), so
that both outcomes are frequent; the judge is the OpenAPI validator, which shares no code with
the prefilter.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.emulator import app as emulator_app
from services.emulator.app import SquareError, check_request_shape

SCHEMAS = ["UpdateOrderRequest", "SearchOrdersRequest", "BatchRetrieveOrdersRequest",
           "CreateOrderRequest", "CreatePaymentRequest", "RefundPaymentRequest",
           "PayOrderRequest", "CompletePaymentRequest"]
COMPONENTS = emulator_app._openapi()["components"]["schemas"]
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=3),
                     st.floats(allow_nan=False, allow_infinity=False))


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = COMPONENTS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _value(draw: st.DrawFn, schema: dict[str, Any], depth: int) -> Any:
    schema = _resolve(schema)
    if draw(st.integers(0, 11)) == 0:           # now and then, something else entirely
        return draw(_SCALARS)
    if "enum" in schema:
        values = list(schema["enum"])
        return draw(st.sampled_from([*values, values[0].lower(), "DIGITAL", "NOT_A_VALUE"]))
    kind = schema.get("type", "object")
    if kind == "object" or "properties" in schema:
        if depth > 4:
            return {}
        body: dict[str, Any] = {}
        for name, sub in (schema.get("properties") or {}).items():
            wanted = name in schema.get("required", ())
            if draw(st.integers(0, 9)) < (8 if wanted else 2):
                body[name] = _value(draw, sub, depth + 1)
        if draw(st.integers(0, 9)) == 0:
            body["not_in_the_schema"] = draw(_SCALARS)
        return body
    if kind == "array":
        return [_value(draw, schema.get("items", {}), depth + 1)
                for _ in range(draw(st.integers(0, 2)))]
    if kind == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength", 12)
        length = draw(st.sampled_from(sorted({0, max(low - 1, 0), low, high, high + 1})))
        return "x" * length
    if kind == "integer":
        return draw(st.sampled_from([0, 1, -1, 2**31, 1.5]))
    if kind == "number":
        return draw(st.sampled_from([0, 1.25, -1, "1"]))
    if kind == "boolean":
        return draw(st.sampled_from([True, False, "true", 0]))
    return draw(_SCALARS)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    name = draw(st.sampled_from(SCHEMAS))
    body = _value(draw, {"$ref": f"#/components/schemas/{name}"}, 0)
    return name, body if isinstance(body, dict) else {"value": body}


_seen = {"passed": 0, "refused": 0}


@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
def test_the_prefilter_never_passes_what_the_openapi_check_refuses(
        case: tuple[str, dict[str, Any]]) -> None:
    name, body = case
    openapi_errors = list(emulator_app._validator(name).iter_errors(body))
    if emulator_app._strict_prefilter(name).is_valid(body):
        _seen["passed"] += 1
        assert not openapi_errors, (name, body, openapi_errors[0].message)
    else:
        _seen["refused"] += 1


def test_the_generated_bodies_exercise_both_outcomes() -> None:
    """Without this the property above could pass vacuously (every body refused)."""
    if not _seen["passed"] + _seen["refused"]:
        test_the_prefilter_never_passes_what_the_openapi_check_refuses()
    total = _seen["passed"] + _seen["refused"]
    assert _seen["passed"] >= total * 0.1, _seen
    assert _seen["refused"] >= total * 0.1, _seen


def test_a_body_the_prefilter_refuses_still_gets_squares_error_from_the_full_check() -> None:
    # Nullable in OAS 3.0, refused by the Draft 4 prefilter: the full check lets it through.
    nullable = {"idempotency_key": "k" * 20, "order": {"location_id": "L1", "version": 1,
                                                         "reference_id": None}}
    assert not emulator_app._strict_prefilter("UpdateOrderRequest").is_valid(nullable)
    check_request_shape("UpdateOrderRequest", nullable)
    # Too long: both refuse, and the error is Square's envelope with the field's path.
    with pytest.raises(SquareError) as refused:
        check_request_shape("UpdateOrderRequest", {"idempotency_key": "k" * 193,
                                                   "order": {"location_id": "L1"}})
    assert (refused.value.code, refused.value.field) == ("VALUE_TOO_LONG", "idempotency_key")
