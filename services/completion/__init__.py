"""Completing approved orders at Square, one narrow facade over its parts:

- `model`: approved items, outcomes, skip reasons, results, idempotency keys;
- `limits`: concurrency (overall, and per merchant growing while answers are fast), back-off,
  the per-merchant circuit breaker, and how long a batch may hold the event loop;
- `journal`: the intent journal (batches, one intent per attempt, outcomes; SQL in the store),
  group-committed on a writer thread;
- `leases`: one holder per merchant across processes;
- `sending`: the last look and UpdateOrder with retries;
- `recovery`: settling open intents whose lease holder is gone;
- `approvals`: four-eyes above a threshold (prepare, decide, and the engine's gate);
- `engine`: `CompletionEngine`, which runs a batch through them.
"""

from typing import TYPE_CHECKING, Any

from services.completion.model import (
    NOT_RECORDED,
    ApprovedItem,
    BatchProgress,
    OrderResult,
    Outcome,
    SkipReason,
    approved_set_sha256,
    idempotency_key,
)

if TYPE_CHECKING:
    from services.completion.engine import CompletionEngine

__all__ = ["NOT_RECORDED", "ApprovedItem", "BatchProgress", "CompletionEngine", "OrderResult",
           "Outcome", "SkipReason", "approved_set_sha256", "idempotency_key"]


def __getattr__(name: str) -> Any:
    # The engine is imported on first use: it pulls in the gateway, the journal and the
    # limits, start-up cost that `queue` and the other commands completing nothing skip.
    if name == "CompletionEngine":
        from services.completion.engine import CompletionEngine
        return CompletionEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
