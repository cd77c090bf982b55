"""Write examples/consents/*.json: consent records for the merchants that the README's
`recon-console emulator serve` (default flags) seeds.

The emulator's merchant ids follow from the seed and the counts (--merchants,
--locations-per-merchant, --orders-per-location), so these files fit exactly that command;
tests/test_cli_output.py regenerates the ids from the README's command and fails when they
drift. Run `python -m tools.example_consents` after changing the seeding or the README command.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.demo import consent_for
from services.emulator.seed import SeededMerchant

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "consents"
# Fixed dates, so the files do not change from run to run: in effect since 1 Nov 2026.
EFFECTIVE_FROM = datetime(2026, 11, 1, tzinfo=UTC)
EXPIRES_AT = "2028-11-01T00:00:00Z"
# One merchant's consent shows the batch limits (the rest of its orders wait for the next batch).
LIMITED = {"max_orders_per_batch": 25,
           "max_amount_per_batch": {"amount": 150000, "currency": "USD"}}


def example_documents(merchants: list[SeededMerchant]) -> dict[str, dict[str, Any]]:
    """File name -> consent record. Like `--write-demo-files`, every merchant but the last two
    consents; those two stay on the reminder list (no consent, orders waiting)."""
    documents: dict[str, dict[str, Any]] = {}
    for index, merchant in enumerate(merchants[:max(1, len(merchants) - 2)]):
        # consent_for makes it effective 30 days before "now", and captured then.
        document = consent_for(merchant, EFFECTIVE_FROM + timedelta(days=30))
        document["expires_at"] = EXPIRES_AT
        if index == 1 and merchant.merchant.currency == "USD":
            document["scope"].update(LIMITED)
        slug = re.sub(r"[^a-z0-9]+", "-", merchant.merchant.business_name.lower()).strip("-")
        documents[f"{index + 1:02d}-{slug}.json"] = document
    return documents


def readme_merchants() -> list[SeededMerchant]:
    """The merchants of the README's `emulator serve` command, seeded as that command does."""
    import shlex

    from console.cli import build_parser
    from services.emulator.seed import SeedConfig, seed_square

    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines()
                if "recon-console emulator serve" in line and "--manifest" in line)
    words = shlex.split(line.split("recon-console", 1)[1].split("&")[0])
    args = build_parser().parse_args(words)
    config = SeedConfig(seed=args.seed, merchants=args.merchants,
                        locations_per_merchant=args.locations_per_merchant,
                        orders_per_location=args.orders_per_location)
    return seed_square(config)[1]


def main() -> None:
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    for old in EXAMPLES.glob("*.json"):
        old.unlink()
    for name, document in example_documents(readme_merchants()).items():
        (EXAMPLES / name).write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
