"""Classifying many orders with one `ConsentView` (which remembers the consent chosen per
location and source) gives exactly what classifying each order on its own gives."""

from __future__ import annotations

import random
import uuid
from datetime import timedelta

from services.consent import ConsentRecord
from services.eligibility import ConsentView, classify
from services.square_models import SquareOrder
from tests.conftest import NOW, consent_document


def consent(rng: random.Random, **changes: object) -> ConsentRecord:
    document = consent_document("M", consent_id=str(uuid.UUID(int=rng.getrandbits(128))),
                                **changes)
    return ConsentRecord.model_validate(document)


def test_a_shared_view_classifies_as_a_fresh_one() -> None:
    rng = random.Random(11)
    locations = ["L1", "L2", "L3"]
    sources = ["Square Online", "Point of Sale", None]
    for _ in range(60):
        consents = []
        for _ in range(rng.randint(0, 3)):
            start = NOW + timedelta(days=rng.choice([-30, -1, 2]))
            changes: dict[str, object] = {
                "effective_from": start.isoformat(),
                "expires_at": (start + timedelta(days=rng.choice([10, 400]))).isoformat(),
                "location_ids": rng.choice(["ALL", ["L1"], ["L2", "L3"]])}
            if rng.random() < 0.3:
                changes["revocation"] = {"revoked_at": (NOW - timedelta(days=1)).isoformat(),
                                         "revoked_by": "owner", "reason": "stopped"}
            consents.append(consent(rng, **changes))
        view = ConsentView.build(consents, NOW)
        for n in range(40):
            order = SquareOrder.model_validate({
                "id": f"O{n}", "location_id": rng.choice(locations), "state": "OPEN",
                "version": 2, "created_at": (NOW - timedelta(hours=rng.choice([1, 48])))
                .isoformat(), "source": {"name": rng.choice(sources)},
                "total_money": {"amount": rng.choice([100, 900000]), "currency": "USD"},
                "net_amount_due_money": {"amount": 0, "currency": "USD"},
                "tenders": [{"type": "CARD", "card_details": {"status": "CAPTURED"}}]})
            assert classify(order, consents, NOW, view) == classify(order, consents, NOW)
