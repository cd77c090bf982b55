"""Attacker's pass on the console: friction that outside text could remove."""

from __future__ import annotations

import pytest
from textual.app import App

from console.screens.confirm import ConfirmScreen
from services.completion.model import ApprovedItem, approved_set_sha256
from services.workspace import Preview


def large_preview(name: str, count: int = 50) -> Preview:
    items = [ApprovedItem("M1", f"O{i:03d}", 1) for i in range(count)]
    return Preview(items, {"M1": {"USD": 100 * count}}, {"M1": name}, [],
                   approved_set_sha256(items))


class Host(App[None]):
    def __init__(self, preview: Preview) -> None:
        super().__init__()
        self.preview = preview
        self.answer: bool | None = None

    def on_mount(self) -> None:
        def done(answer: bool | None) -> None:
            self.answer = answer
        self.push_screen(ConfirmScreen(self.preview), done)


# A business name that is only spaces (Square's text, anything goes) made "" an accepted
# answer: a large batch confirmed with a bare Enter.
@pytest.mark.parametrize("name", ["   ", "\u3000", "\t \u00a0"])
async def test_a_blank_merchant_name_does_not_make_enter_confirm_a_large_batch(
        name: str) -> None:
    app = Host(large_preview(name))
    async with app.run_test() as pilot:
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen) and app.screen.typed
        await pilot.press("enter")
        await pilot.pause()
        assert app.answer is None and isinstance(app.screen, ConfirmScreen)
        await pilot.press("5", "0", "enter")  # the count still confirms
        await pilot.pause()
        assert app.answer is True
