"""The Textual console and the `recon-console` command line. Talks to `services.workspace`."""
