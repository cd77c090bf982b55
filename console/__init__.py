"""The Textual console and the `recon-console` command line. Talks to `services.workspace`."""

import os

# No pydantic plugin is loaded in the console's processes (the TUI, every command, the
# processes a discovery starts, which inherit this): a plugin sees every value validated,
# settings and Square's answers included, so it could carry a token into its own logs; and
# finding plugins reads the metadata of every installed package, ~50 ms of every start
# (issue 11). Set before pydantic builds its first model, which is when it looks.
os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
