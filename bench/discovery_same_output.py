"""The same `queue --json` document, byte for byte, from this tree and a baseline checkout (git
`main` by default, in a temporary worktree): both discover the bench's data (bench/discovery.py:
200 merchants x 2 locations x 250 open orders) from one emulator, each on a fresh database made
by its own code, with the workspace's clock pinned to one moment (verdicts such as TOO_RECENT
and every `fetched_at` depend on it). Exit 1 when the documents differ.

    .venv/bin/python -m bench.discovery_same_output [--merchants 200] [--baseline-ref main]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench._support import ROOT, loopback_emulator, scratch_dir
from bench.completion import baseline_checkout
from bench.discovery import emulator_args, prepare

# console.cli with Workspace.open's clock pinned to argv[1]; guarded, because a discovery's
# second process (spawn) imports the main module again.
PINNED = """
import sys
if __name__ == "__main__":
    sys.path.insert(0, ".")
    from datetime import datetime
    import services.workspace as w
    moment, plain = datetime.fromisoformat(sys.argv[1]), w.Workspace.open.__func__
    def pinned(cls, *args, **kwargs):
        workspace = plain(cls, *args, **kwargs)
        workspace.clock = lambda: moment
        return workspace
    w.Workspace.open = classmethod(pinned)
    from console.cli import main
    raise SystemExit(main(sys.argv[2:]))
"""


def document(tree: Path, env: dict[str, str], consents: Path, moment: str) -> bytes:
    db = scratch_dir("bench-same-") / "recon.db"
    env = dict(env, RECON_DB=str(db))
    subprocess.run([sys.executable, "-m", "console.cli", "consent", "import", str(consents)],
                   cwd=tree, env=env, check=True, capture_output=True)
    launcher = db.with_name("pinned.py")
    launcher.write_text(PINNED)
    return subprocess.run([sys.executable, str(launcher), moment, "queue", "--json",
                           "--include-ineligible"], cwd=tree, env=env, check=True,
                          capture_output=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--baseline-ref", default="main",
                        help="git ref of the baseline, run from a temporary worktree")
    args = parser.parse_args()
    baseline = baseline_checkout(args.baseline_ref)
    moment = datetime.now(UTC).isoformat()
    try:
        with loopback_emulator(*emulator_args(args.merchants)) as manifest:
            consents, env = prepare(manifest)
            documents = {name: document(tree, env, consents, moment)
                         for name, tree in (("baseline", baseline), ("this tree", ROOT))}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                        str(baseline)], check=False)
    for name, data in documents.items():
        orders = data.count(b'"order_id"')
        print(f"{name:10} {len(data):,} bytes, {orders:,} orders, "
              f"sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    same = documents["baseline"] == documents["this tree"]
    print("identical" if same else "DIFFERENT")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
