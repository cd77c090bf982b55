"""Independent judges for tests: they read the emulator's raw JSON and never import `services/`."""
