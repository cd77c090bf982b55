"""Everything that is not UI: domain, Square gateway, store, consent, audit, engine, emulator.

Nothing in this package imports `textual` (a test enforces it).
"""
