"""A modal's tinted view of the screen below it, drawn once rather than on every render.

Textual draws a modal screen with a translucent background by rendering the whole screen below
and tinting each of its segments (`BackgroundScreen`), on every render of the modal: mounting
the confirmation over a 160x50 queue rendered it several times, ~30 ms of UI-thread CPU each.
The screen below is inert while the modal is up, so its tinted picture is kept from the first
render at a size; the modal's own widgets are drawn over it as usual. A change below (a
reload landing meanwhile) shows once the modal is gone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.renderables.background_screen import BackgroundScreen

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
    from rich.segment import Segment

__all__ = ["FrozenBackdrop"]


class FrozenBackdrop:
    """Keeps the segments a `BackgroundScreen` rendered, per render size."""

    def __init__(self) -> None:
        self._background: BackgroundScreen | None = None
        self._size: tuple[int, int | None] | None = None
        self._segments: list[Segment] = []

    def wrap(self, renderable: RenderableType) -> RenderableType:
        """What the modal's `render` returns: this, for Textual's tinted screen below (its
        picture kept), anything else (an opaque background) as it is."""
        if type(renderable) is not BackgroundScreen:
            return renderable
        background = self._background
        if (background is None or background.screen is not renderable.screen
                or background.color != renderable.color):
            self._background, self._size = renderable, None
        return self

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        assert self._background is not None
        size = (options.max_width, options.height)
        if self._size != size:
            self._segments = list(console.render(self._background, options))
            self._size = size
        return self._segments
