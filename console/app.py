"""The Textual console. Built by `ReconApp(workspace=...)` (or a factory that makes one in a
thread, as the demo does); everything it does to Square or the database goes through the
`Workspace` it is handed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.notifications import SeverityLevel
from textual.screen import Screen

from console.crash import crash_line, write_crash_log
from console.messages import describe
from console.safe_text import printable, safe
from console.screens.base import CompleteRequested, ConsoleScreen, Refreshed
from console.screens.confirm import ConfirmScreen, confirmation_of
from console.screens.help import HelpScreen
from console.screens.merchants import MerchantsScreen
from console.wording import plural

# The light modals (confirm, help) are imported at once, as before: help imported on its key
# left the merchants table's header behind it unrepainted in a snapshot now and then.
# The first screen (merchants) needs none of these: importing them (the store, Square's SDK,
# the completion engine, the other screens) cost `recon-console demo` ~0.5 s before it
# painted anything. They are imported where used; the demo's workspace thread imports them
# while the first screen paints (`SECOND_SCREENS`).
if TYPE_CHECKING:
    from services.changes import ChangeFeed
    from services.completion import OrderResult
    from services.settings import ReconSettings
    from services.workspace import Preview, Workspace

SECOND_SCREENS = ("console.screens.approvals", "console.screens.audit",
                  "console.screens.progress", "console.screens.queue",
                  "console.screens.reminders")

__all__ = ["ReconApp", "run_console", "run_demo"]


class ReconApp(App[int]):
    CSS_PATH = "styles/app.tcss"
    TITLE = "Managed Reconciliation Console"
    BINDINGS = [
        Binding("question_mark", "help", "Help", id="app.help"),
        Binding("A", "audit", "Audit", id="app.audit"),
        Binding("M", "reminders", "Reminders", id="app.reminders"),
        # Off the footer (its snapshots stay as they are); in the palette, help and README.
        Binding("P", "approvals", "Approvals", id="app.approvals", show=False),
        # Off the footer (the status line says "press R" when intents are open); in the
        # palette and help.
        Binding("R", "recover", "Recover", id="app.recover", show=False),
        Binding("q", "quit", "Quit", id="app.quit"),
    ]

    def __init__(self, workspace: Workspace | None = None, *,
                 workspace_factory: Callable[[], Workspace] | None = None,
                 read_only: bool = False, refresh_on_start: bool = True,
                 subtitle: str = "", freeze_heap_after_start: bool = False) -> None:
        super().__init__()
        # The console's own process only (tests run many apps in one; see on_refreshed).
        self.freeze_heap_after_start = freeze_heap_after_start
        self.workspace: Workspace | None = workspace
        self.workspace_factory = workspace_factory
        self.read_only = read_only
        self.refresh_on_start = refresh_on_start
        self.status = "Starting…"
        # The screen whose own message the status line shows (None: the app's own).
        self.status_owner: Screen[Any] | None = None
        self.app_status = ("", False)  # the app's own latest line (refresh, recover)
        self.last_error: str | None = None
        self.busy = False
        self.sub_title = printable(subtitle) + ("  READ-ONLY" if read_only else "")
        self.crash_message: str | None = None
        # Presence and live updates (issue 14); tests shorten them.
        self._presence_heartbeat_s: float | None = None  # None: services.presence's
        self._presence_expiry_s: float | None = None
        self.tick_s = 1.0                 # the longest `watch_changes` waits between ticks
        self.changes: ChangeFeed | None = None
        self.changes_loaded = 0           # the feed's version the screens last reloaded at
        self._live_pending = False
        self._reload_s = 0.0              # how long the last reload took

    @property
    def presence_heartbeat_s(self) -> float:
        if self._presence_heartbeat_s is None:
            from services.presence import HEARTBEAT_S
            self._presence_heartbeat_s = HEARTBEAT_S
        return self._presence_heartbeat_s

    @presence_heartbeat_s.setter
    def presence_heartbeat_s(self, seconds: float) -> None:
        self._presence_heartbeat_s = seconds

    @property
    def presence_expiry_s(self) -> float:
        if self._presence_expiry_s is None:
            from services.presence import EXPIRY_S
            self._presence_expiry_s = EXPIRY_S
        return self._presence_expiry_s

    @presence_expiry_s.setter
    def presence_expiry_s(self, seconds: float) -> None:
        self._presence_expiry_s = seconds

    def on_mount(self) -> None:
        self.push_screen(MerchantsScreen())
        if self.workspace is None and self.workspace_factory is not None:
            # Once the first screen is painted: the demo's workspace (imports, emulator,
            # seed) is built in a thread, and would hold the GIL against that first paint.
            self.call_after_refresh(self.prepare)
        else:
            self.prepare()

    async def on_unmount(self) -> None:
        if self.workspace is not None:
            await self.workspace.aclose()

    # ------------------------------------------------------------------ workers
    @work(exclusive=True, group="prepare")
    async def prepare(self) -> None:
        if self.workspace is None and self.workspace_factory is not None:
            self.set_status("Starting the demo: seeding the local Square emulator…")
            try:
                self.workspace = await asyncio.to_thread(build_workspace,
                                                         self.workspace_factory)
            except Exception as error:  # shown, never fatal
                self.set_status(describe(error), error=True)
                return
        if self.workspace is None:
            return
        self.workspace.go_online("read-only console" if self.read_only else "console",
                                 self.presence_heartbeat_s)
        self.changes = self.workspace.changes()
        self.changes_loaded = self.changes.version()
        self.watch_changes()
        recovered = ""
        if not self.read_only and self.workspace.open_intent_count():
            self.set_status("Settling unfinished completions from last time…")
            try:
                recovered = "At start: " + await self.recover_and_say()
            except Exception as error:
                recovered = describe(error)
                self.set_status(recovered, error=True)
            self.notify(recovered, title="Recover", timeout=15)
        if self.refresh_on_start:
            await self.refresh_data()
        else:
            self.post_message(Refreshed())
        if recovered:  # what recovery settled stays in view after the refresh's own line
            self.set_status(f"{self.status}  {recovered}")

    async def refresh_data(self, merchant_ids: list[str] | None = None) -> None:
        """Discover open orders at Square (per merchant errors are kept per merchant)."""
        assert self.workspace is not None
        self.busy = True
        self.set_status("Refreshing from Square…")
        error_text = None
        try:
            done = 0

            def on_merchant(_: object) -> None:
                nonlocal done
                done += 1
                self.set_status(f"Refreshing from Square… {done} merchants done")

            reports = await self.workspace.refresh(merchant_ids, on_merchant=on_merchant)
            failed = sum(1 for r in reports if r.error)
            text = "Refreshed."
            if failed:
                text = (f"Refreshed: {failed} of {len(reports)} merchants have a problem; "
                        "the merchants screen's Note column says what to do.")
            open_intents = self.workspace.open_intent_count()
            if open_intents:
                text += f" {open_intents} unsettled intents: press R to recover."
            self.set_status(text)
        except Exception as error:
            error_text = describe(error)
            self.set_status(error_text, error=True)
        finally:
            self.busy = False
        self.post_message(Refreshed(error_text))

    @work(exclusive=True, group="refresh")
    async def action_refresh(self) -> None:
        if self.workspace is None or self.busy:
            return
        await self.refresh_data()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "recover":
            return not self.read_only
        return True

    @work(exclusive=True, group="recover")
    async def action_recover(self) -> None:
        """Settle open intents whose lease holder is gone, and say what was settled."""
        if self.workspace is None or self.busy:
            return
        self.busy = True
        self.set_status("Recovering: settling unfinished completions against Square…")
        try:
            self.set_status(await self.recover_and_say())
        except Exception as error:
            self.set_status(describe(error), error=True)
        finally:
            self.busy = False
        self.post_message(Refreshed())

    async def recover_and_say(self) -> str:
        """Settle the open intents; the sentence that says what was settled."""
        assert self.workspace is not None
        self.workspace.credentials()
        results = await self.workspace.recover()
        return recovery_text(results, self.workspace.open_intent_count(),
                             self.workspace.recover_left_alone)

    def set_status(self, text: str, error: bool = False,
                   owner: Screen[Any] | None = None) -> None:
        """`owner`: the screen the message is about; it is cleared when another comes up."""
        self.status = text
        self.status_owner = owner
        if owner is None:
            self.app_status = (text, error)
        if error:
            self.last_error = text
            self.notify(text, severity="error", timeout=8)
        for screen in self.screen_stack:
            if isinstance(screen, ConsoleScreen):
                screen.show_status(text, error)

    def forget_status_of_others(self, screen: Screen[Any]) -> None:
        if self.status_owner is not None and self.status_owner is not screen:
            self.set_status(*self.app_status)  # back to the app's own latest line

    @work(exclusive=True, group="changes")
    async def watch_changes(self) -> None:
        """Another process's writes (orders completed, a consent revoked, a lease taken)
        reach this console within a second, without a refresh: the change feed moves, and
        the screens reload (a Refreshed). Once a second, the screen in view ticks."""
        assert self.changes is not None
        while True:
            try:
                version = await self.changes.wait(self.changes_loaded, self.tick_s)
                # While this console refreshes, its own Refreshed follows and covers it.
                if version != self.changes_loaded and not self.busy \
                        and not self._live_pending:
                    self._live_pending = True
                    self.post_message(Refreshed(live=True))
                    # Another operator's batch moves the feed all the time: a 50,000-order
                    # queue reloads at most about half the time, and still within a second.
                    await asyncio.sleep(min(self.tick_s, self._reload_s))
                elif version != self.changes_loaded:
                    await asyncio.sleep(self.tick_s / 4)
                if isinstance(self.screen, ConsoleScreen):
                    self.screen.tick()
            except Exception as error:  # shown, never fatal; tried again
                self.set_status(f"Live updates paused: {describe(error)}", error=True)
                await asyncio.sleep(5)

    def on_refreshed(self, message: Refreshed) -> None:
        if self.freeze_heap_after_start:
            self.freeze_heap_after_start = False
            self.call_after_refresh(freeze_heap)
        try:
            version = self.changes.version() if self.changes is not None else None
        except Exception:
            version = None  # reload anyway; the feed is asked again on its next poll
        if message.live:
            self._live_pending = False
            if version == self.changes_loaded:
                return  # a reload since the change was seen already shows it
        if version is not None:
            # Read before reloading: a change committed meanwhile is seen again, not missed.
            self.changes_loaded = version
        began = time.monotonic()
        for screen in self.screen_stack:
            if not isinstance(screen, ConsoleScreen):
                continue
            if message.live and screen is not self.screen:
                screen.stale = True  # reloads when it comes back into view
            else:
                screen.reload()
        self._reload_s = time.monotonic() - began

    def on_complete_requested(self, message: CompleteRequested) -> None:
        self.start_completion(message.order_ids)

    @work(exclusive=True, group="preview", description="preview")
    async def start_completion(self, order_ids: list[str]) -> None:
        """Preview the chosen orders, confirm, then run the batch on the progress screen.
        The preview reads the whole queue: in a thread, on a connection of its own; the
        four-eyes check and the dialog's text too, so the UI thread only mounts it."""
        if self.read_only or self.workspace is None:
            return
        preview, why, text = await asyncio.to_thread(confirmation_of, self.workspace,
                                                     order_ids)
        if preview.count == 0:
            reasons = sorted({r for _, r in preview.held_back})
            extra = f" (held back: {', '.join(reasons)})" if reasons else ""
            self.notify("None of the selected orders can be completed now" + extra + ".",
                        severity="warning")
            return

        def confirmed(approved: bool | None) -> None:
            if approved and why:
                self.prepare_for_second_operator(preview, why)
            elif approved:
                from console.screens.progress import ProgressScreen
                self.push_screen(ProgressScreen(preview))
            else:
                self.notify(f"Not confirmed: nothing was sent ({plural(preview.count, 'order')} "
                            "stay selected).")

        self.push_screen(ConfirmScreen(preview, why, text), confirmed)

    def prepare_for_second_operator(self, preview: Preview, why: str,
                                    what: str = "This batch") -> None:
        """Four-eyes: the confirmed batch is kept for another operator (Approvals, P);
        nothing is sent."""
        assert self.workspace is not None
        batch = self.workspace.prepare_batch(preview)
        self.notify(f"{what} needs a second operator ({why}): prepared as batch "
                    f"{batch.batch_id[:8]}; nothing was sent. Another operator approves it on "
                    "the Approvals screen (P).", timeout=15)

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = True) -> None:
        """Every toast (screens' and widgets' too: theirs come here) shows its text
        literally: messages carry names, paths and Square's own error text."""
        super().notify(printable(message), title=printable(title), severity=severity,
                       timeout=timeout, markup=False)

    # ------------------------------------------------------------------ crashes
    def known_secrets(self) -> list[str]:
        """The access tokens in memory: a crash log must not contain them."""
        workspace = self.workspace
        if workspace is None:
            return []
        try:
            credentials = workspace.credentials(required=False)
        except Exception:
            return []
        return [c.access_token.get_secret_value() for c in credentials.values()]

    def _handle_exception(self, error: Exception) -> None:
        # Textual would print the traceback with every frame's locals (credentials among
        # them) to the terminal. The traceback goes to a private, scrubbed log instead.
        secrets = self.known_secrets()
        try:
            log = write_crash_log(error, secrets)
        except OSError:
            log = None
        self.crash_message = crash_line(error, secrets, log)
        super()._handle_exception(error)

    def _fatal_error(self) -> None:
        self.bell()
        self.panic(safe(self.crash_message or "recon-console stopped on an unexpected error.",
                        no_wrap=True, overflow="ignore"))  # one line, however wide

    # ------------------------------------------------------------------ actions
    def action_help(self) -> None:
        bindings = [(_key_shown(self.get_key_display(b.binding), b.binding.key),
                     b.binding.description or b.binding.action, b.binding.id or "")
                    for b in self.active_bindings.values()]
        self.push_screen(HelpScreen(bindings))

    def action_audit(self) -> None:
        from console.screens.audit import AuditScreen
        if self.workspace is not None and not isinstance(self.screen, AuditScreen):
            self.push_screen(AuditScreen())

    def action_approvals(self) -> None:
        from console.screens.approvals import ApprovalsScreen
        if self.workspace is not None and not isinstance(self.screen, ApprovalsScreen):
            self.push_screen(ApprovalsScreen())

    def action_reminders(self) -> None:
        from console.screens.reminders import RemindersScreen
        if self.workspace is not None and not isinstance(self.screen, RemindersScreen):
            self.push_screen(RemindersScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Refresh from Square", "Discover open orders again",
                            self.action_refresh)
        yield SystemCommand("Audit trail", "Entries, chain status and export",
                            self.action_audit)
        yield SystemCommand("Reminders", "Friendly reminders: due, preview, send, history",
                            self.action_reminders)
        yield SystemCommand("Approvals", "Four-eyes: batches waiting for a second operator",
                            self.action_approvals)
        if not self.read_only:
            yield SystemCommand("Recover", "Settle unfinished completions against Square",
                                self.action_recover)
        if isinstance(screen, ConsoleScreen):
            yield from screen.palette_commands()


def build_workspace(factory: Callable[[], Workspace]) -> Workspace:
    """Runs in a worker thread (the demo's): the workspace, then the screens the first one
    does not need, so opening one later costs no import on the UI thread."""
    workspace = factory()
    import_second_screens()
    return workspace


def import_second_screens() -> None:
    """Import the screens the first one does not need, off the UI thread (the demo does it
    in its workspace thread), so opening one later costs no import."""
    import importlib
    for name in SECOND_SCREENS:
        importlib.import_module(name)


def recovery_text(results: list[OrderResult], still_open: int, left_alone: list[str]) -> str:
    from services.completion import Outcome
    counts = {o: sum(1 for r in results if r.outcome is o) for o in Outcome}
    text = (f"Recovered: settled {len(results)} "
            f"({counts[Outcome.COMPLETED]} completed, {counts[Outcome.SKIPPED]} skipped, "
            f"{counts[Outcome.FAILED]} failed); {still_open} still open.")
    if left_alone:
        text += f" Left alone, another run is live: {'; '.join(left_alone)}"
    return text


def load_keymap(path: Path) -> dict[str, str]:
    """Binding id -> keys, from a TOML file of `"queue.complete" = "ctrl+k"` lines. A missing
    file is no keymap; a bad one is a one-line error."""
    import tomllib

    from services.errors import ConfigurationError
    if not path.exists():
        return {}
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"{path}: not valid TOML ({error}).") from None
    if not all(isinstance(v, str) for v in document.values()):
        raise ConfigurationError(f'{path}: each line must be "binding.id" = "keys", e.g. '
                                 '"queue.complete" = "ctrl+k".')
    return {str(k): str(v) for k, v in document.items()}


def _key_shown(display: str, name: str) -> str:
    """A key in the help: as the footer shows it (`?`, `⏎`, `^p`), and its name where that
    differs (`question_mark`, `enter`, `ctrl+p`: how a keymap file spells it)."""
    return display if display == name else f"{display}  ({name})"


def freeze_heap() -> None:
    """Once, when the console has started (modules imported, workspace and first screen up):
    what lives now lives as long as the process, and the cyclic collector need not walk it
    again. A full collection walks every tracked object holding the GIL, and 100,000 of
    Textual's, the modules' and the demo emulator's made each one a UI stall of 50-200 ms.
    Collected first, so no garbage is kept."""
    import gc
    gc.collect()
    gc.freeze()


def run_console(settings: ReconSettings, read_only: bool = False) -> int:
    from services.workspace import Workspace
    workspace = Workspace.open(settings)
    workspace.credentials(required=False)  # a bad file is shown in the console, not fatal
    app = ReconApp(workspace, read_only=read_only, freeze_heap_after_start=True,
                   subtitle=f"Square: {settings.target}  operator {settings.operator}")
    app.set_keymap(load_keymap(settings.keymap))
    app.run()
    return exit_code(app)


def exit_code(app: ReconApp) -> int:
    """0 when the operator quit; 1 when the console died (it said why on stderr)."""
    return 1 if app.return_code else 0


def run_team_demo(settings: ReconSettings, read_only: bool = False, seed: int = 7) -> int:
    """`demo --team`: the demo on a throwaway PostgreSQL cluster; prints the command for a
    second console as another operator, and deletes it all when this console closes."""
    import shutil
    import signal
    import sys

    from services.team_demo import team_demo
    print("Starting a throwaway PostgreSQL cluster with the demo data...", file=sys.stderr)
    # A `kill` or a closed terminal must still delete the cluster: SIGTERM and SIGHUP unwind
    # like Ctrl-C does (a SIGKILLed demo's is deleted by the next start).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    with team_demo(seed=seed, operator=settings.operator) as demo:
        # `recon-console` if the shell finds it, else this very script (.venv/bin/...).
        program = "recon-console"
        if shutil.which(program) is None and Path(sys.argv[0]).name == program:
            program = str(Path(sys.argv[0]).resolve())
        for line in (f"Team demo: PostgreSQL at {demo.url}, Square emulator at {demo.base_url}.",
                     "Open a second console on it, as another operator, with:", "",
                     f"  {demo.second_console_command(program)}", "",
                     "Everything is deleted when this console closes."):
            print(printable(line))
        if sys.stdin.isatty():
            input("Press Enter to open your console... ")
        return run_console(demo.settings(settings.operator), read_only=read_only)


def run_demo(settings: ReconSettings, read_only: bool = False, seed: int = 7) -> int:
    def factory() -> Workspace:
        # Imported here, in the factory's thread: the emulator, the store and Square's SDK
        # load while the first screen paints, not before it.
        from services.demo import build_demo
        return build_demo(seed=seed, operator=settings.operator, mail=True).workspace

    app = ReconApp(workspace_factory=factory, read_only=read_only, freeze_heap_after_start=True,
                   subtitle=f"DEMO  Square: local emulator (in-process)  "
                            f"operator {settings.operator}")
    app.set_keymap(load_keymap(settings.keymap))
    app.run()
    if app.workspace is not None:
        print(printable(f"Demo database kept at {Path(str(app.workspace.settings.db))}"))
    return exit_code(app)
