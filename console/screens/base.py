"""What the console's main screens share: typed access to the app and its workspace, the
status line, and the messages screens post up to the app (screens never call into it)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from textual.app import SystemCommand
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Static

from console.safe_text import safe

if TYPE_CHECKING:  # for the type only: console.app imports the screens, not the reverse
    from console.app import ReconApp
    from services.workspace import Workspace  # types only (see console/app.py)


# The worker group of the workers that bring a screen's data in (tests wait for them).
LOAD_GROUP = "load"


class Refreshed(Message):
    """The workspace's data changed (a refresh, a batch, a recovery, reminders sent): the app
    has every screen reload. `live`: another process changed it (the change feed said so);
    only the screen in view reloads now, the others when they come back into view."""

    def __init__(self, error: str | None = None, *, live: bool = False) -> None:
        super().__init__()
        self.error = error
        self.live = live


class CompleteRequested(Message):
    """A screen asks the app to preview, confirm and complete these orders."""

    def __init__(self, order_ids: list[str]) -> None:
        super().__init__()
        self.order_ids = order_ids


class AppScreen(Screen[None]):
    """Any screen of this app: typed access to the app and its workspace (typed once, here)."""

    @property
    def recon(self) -> ReconApp:
        return cast("ReconApp", self.app)

    @property
    def workspace(self) -> Workspace:
        """The app's workspace; a screen that needs one is opened only once it exists."""
        workspace = self.recon.workspace
        assert workspace is not None
        return workspace


class ConsoleScreen(AppScreen):
    stale = False  # data changed while another screen was in view: reload on resume

    def show_status(self, text: str, error: bool = False) -> None:
        """The app calls this on every screen when its status changes."""
        status = self.query_one("#status", Static)
        status.update(safe(text))  # carries merchants' names and Square's error text
        status.set_class(error, "error")

    def say(self, text: str, error: bool = False) -> None:
        """A status line of this screen's own: cleared when another screen comes up."""
        self.recon.set_status(text, error=error, owner=self)

    def on_screen_resume(self) -> None:
        # A message another screen left behind is about that screen, not this one.
        self.recon.forget_status_of_others(self)
        if self.stale:
            self.stale = False
            self.reload()

    def reload(self) -> None:
        """Show the workspace's data again (after a refresh, a batch, a recovery)."""

    def tick(self) -> None:
        """About once a second while in view: what changes with time alone (who is online,
        leases whose holder stopped heart-beating)."""

    def palette_commands(self) -> Iterable[SystemCommand]:
        """This screen's own entries in the command palette."""
        return ()
