"""A local Square: the parts of Square's API this product uses, with Square's rules and faults.

`seed_square` builds the data, `build_app` wraps it as an ASGI app, `serve` runs it on loopback.
"""

from services.emulator.app import EmulatorApp, build_app
from services.emulator.faults import FaultPlan
from services.emulator.seed import SeedConfig, SeededMerchant, seed_square
from services.emulator.state import EmulatedSquare, SquareError

__all__ = ["EmulatedSquare", "EmulatorApp", "FaultPlan", "SeedConfig", "SeededMerchant",
           "SquareError", "build_app", "seed_square"]
