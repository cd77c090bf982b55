"""What the console's main screens share: typed access to the app, and the status line."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.screen import Screen
from textual.widgets import Static

from console.safe_text import safe

if TYPE_CHECKING:
    from console.app import ReconApp


class ConsoleScreen(Screen[None]):
    @property
    def recon(self) -> ReconApp:
        return cast("ReconApp", self.app)

    def show_status(self, text: str, error: bool = False) -> None:
        """The app calls this on every screen when its status changes."""
        status = self.query_one("#status", Static)
        status.update(safe(text))  # carries merchants' names and Square's error text
        status.set_class(error, "error")
