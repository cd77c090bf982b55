"""Signed audit checkpoints, kept outside the database.

Someone who can write the database file can drop the append-only triggers, rewrite entries and
recompute every hash, or cut the tail; a crash that loses the WAL cuts the tail too. The chain
alone cannot tell. A checkpoint, `{"size", "head_hash", "created_at", "signature"}`, says "the
chain had `size` entries and entry `size` had hash `head_hash`"; its signature is HMAC-SHA256
over the canonical JSON (keys sorted, no spaces) of the other three fields, with a key that never
enters the database: `[audit] checkpoint_key` in the credentials file, else its own 0600 key file
beside the credentials file, made on first use.

Files are named `checkpoint-<size, 12 digits>-<UTC time>.json`, so the largest sorts last: the
latest anchor is the largest, whatever the clock did. A new one is written only if the chain
still extends the latest (same hash at its size), so a tampered chain is never signed; by
induction, checking the chain against the latest checks it against all of them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import tomllib
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from services.audit import AuditTrail, Checkpoint, VerifyReport
from services.errors import AuditChainError, ConfigurationError

__all__ = ["KEY_FILE_NAME", "CheckpointAnchor", "CheckpointKey", "ProblemKind",
           "default_checkpoint_dir", "read_checkpoint_file", "sign", "signature_ok"]

KEY_FILE_NAME = "checkpoint.key"
_PREFIX = "checkpoint-"
_MIN_KEY_CHARS = 32


class ProblemKind(StrEnum):
    """`problem_kind` in `audit verify --json` about the checkpoint itself (those about the
    chain, a cut tail or rewritten history among them, are audit.ChainProblem)."""

    NO_CHECKPOINT = "no_checkpoint"            # a warning: ok, but the tail is not anchored
    FORGED_CHECKPOINT = "forged_checkpoint"
    KEY_MISSING = "checkpoint_key_missing"


@dataclass(frozen=True)
class CheckpointKey:
    secret: bytes = field(repr=False)
    source: str                                # where it came from, for messages (never the key)


def default_checkpoint_dir(credentials: Path, db: Path | str) -> Path:
    """`checkpoints/` beside the credentials file, one folder per database: two databases that
    share a credentials file must not anchor each other (the second would look rewritten)."""
    # A URL (team mode) is named by its database; its digest keeps two servers apart.
    name = (urlsplit(db).path.strip("/") if isinstance(db, str) and "://" in db
            else Path(str(db)).name) or "db"
    resolved = str(Path(db).resolve()) if isinstance(db, Path) else str(db)
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return credentials.parent / "checkpoints" / f"{name}-{digest}"


def _refuse_if_shared(path: Path, what: str) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(f"{path}: {what} is readable by group or others; run "
                                 f"`chmod 600 {path}` and rotate it if others may have read it.")


def _key_from_credentials(credentials: Path) -> CheckpointKey | None:
    if not credentials.is_file():
        return None
    _refuse_if_shared(credentials, "the credentials file")
    try:
        document = tomllib.loads(credentials.read_text())
    except OSError as error:
        raise ConfigurationError(f"{credentials}: cannot read it for the checkpoint key "
                                 f"({error.strerror}).") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        # The parser's message names the line, never the text (it may be a token).
        raise ConfigurationError(f"{credentials}: not valid TOML "
                                 f"({str(error).splitlines()[0]}).") from None
    section = document.get("audit")
    if not isinstance(section, dict) or "checkpoint_key" not in section:
        return None
    value = section["checkpoint_key"]
    if not isinstance(value, str) or len(value.strip()) < _MIN_KEY_CHARS:
        raise ConfigurationError(f"{credentials}: [audit] checkpoint_key must be a string of at "
                                 f"least {_MIN_KEY_CHARS} characters, e.g. `python3 -c "
                                 "'import secrets; print(secrets.token_hex(32))'`.")
    return CheckpointKey(value.strip().encode(), f"{credentials} [audit] checkpoint_key")


def _read_key_file(path: Path) -> CheckpointKey:
    _refuse_if_shared(path, "the checkpoint key")
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise ConfigurationError(f"{path}: not a checkpoint key (hex); restore it from backup, "
                                 "or move it and the checkpoints aside to start anew.")
    return CheckpointKey(secret, str(path))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes, *, replace_existing: bool = True) -> bool:
    """Write atomically (temporary file, fsync, rename, fsync the folder), owner-only.
    With replace_existing=False an existing file wins (returns False)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace_existing:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if another process made it first
            except FileExistsError:
                return False
            finally:
                tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return True


def _canonical(checkpoint: Checkpoint) -> bytes:
    return orjson.dumps({"size": checkpoint.size, "head_hash": checkpoint.head_hash,
                         "created_at": checkpoint.created_at}, option=orjson.OPT_SORT_KEYS)


def sign(checkpoint: Checkpoint, key: CheckpointKey) -> Checkpoint:
    digest = hmac.new(key.secret, _canonical(checkpoint), hashlib.sha256).hexdigest()
    return replace(checkpoint, signature=digest)


def signature_ok(checkpoint: Checkpoint, key: CheckpointKey) -> bool:
    expected = sign(checkpoint, key).signature or ""
    return hmac.compare_digest(expected, checkpoint.signature or "")


def read_checkpoint_file(path: Path) -> Checkpoint:
    """Parse a checkpoint file; ValueError says what is wrong with it."""
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as error:
        raise ValueError(f"cannot read it ({error.strerror})") from None
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    size, head, created = data.get("size"), data.get("head_hash"), data.get("created_at")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError("no whole-number `size`")
    if not isinstance(head, str) or not isinstance(created, str):
        raise ValueError("no `head_hash` or `created_at`")
    signature = data.get("signature")
    return Checkpoint(size, head, created,
                      signature if isinstance(signature, str) else None)


@dataclass(frozen=True)
class CheckpointAnchor:
    """Where a database's checkpoints live and where their key comes from."""

    directory: Path
    credentials: Path

    @property
    def key_file(self) -> Path:
        return self.credentials.parent / KEY_FILE_NAME

    def key(self, create: bool = False) -> CheckpointKey | None:
        """The signing key; made (32 random bytes, hex, 0600) only when `create` is set, so
        that checking never invents a key the checkpoints were not signed with."""
        configured = _key_from_credentials(self.credentials)
        if configured is not None:
            return configured
        if self.key_file.exists():
            return _read_key_file(self.key_file)
        if not create:
            return None
        _write_private(self.key_file, (secrets.token_bytes(32).hex() + "\n").encode(),
                       replace_existing=False)
        return _read_key_file(self.key_file)  # ours, or the one another process made first

    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        try:
            return sorted(p for p in self.directory.iterdir()
                          if p.name.startswith(_PREFIX) and p.suffix == ".json")
        except OSError as error:
            raise ConfigurationError(f"{self.directory}: cannot list checkpoints "
                                     f"({error.strerror}); check --checkpoint-dir.") from None

    def latest(self) -> Path | None:
        files = self.files()
        return files[-1] if files else None

    def write(self, trail: AuditTrail, output: Path | None = None,
              skip_if_unchanged: bool = False) -> Path | None:
        """Sign the chain's current size and head; into `output`, or into the directory.
        Refuses (AuditChainError) when the chain no longer extends the latest checkpoint:
        signing it would launder a cut or a rewrite. Returns None when skip_if_unchanged and
        the latest checkpoint already covers the chain."""
        try:
            key = self.key(create=True)
        except OSError as error:
            raise ConfigurationError(f"{self.key_file}: cannot make the checkpoint key "
                                     f"({error.strerror}).") from None
        assert key is not None
        current = trail.checkpoint()
        latest = self.latest()
        if latest is not None:
            previous = self._checked(latest, key)
            problem = _extends(trail, previous)
            if problem is not None:
                raise AuditChainError(
                    f"checkpoint not written: {problem} (against {latest}); run "
                    "`recon-console audit verify` to see what changed.")
            if skip_if_unchanged and output is None and previous.size == current.size:
                return None
        signed = sign(current, key)
        document = orjson.dumps(signed.to_json(), option=orjson.OPT_INDENT_2) + b"\n"
        path = output or self.directory / _file_name(signed)
        try:
            _write_private(path, document)
        except OSError as error:
            raise ConfigurationError(f"{path}: cannot write the checkpoint ({error.strerror}); "
                                     "check --checkpoint-dir or --output.") from None
        return path

    def _checked(self, path: Path, key: CheckpointKey) -> Checkpoint:
        try:
            checkpoint = read_checkpoint_file(path)
        except ValueError as error:
            raise AuditChainError(f"checkpoint not written: the latest checkpoint {path} is "
                                  f"damaged ({error}).") from None
        if not signature_ok(checkpoint, key):
            raise AuditChainError(f"checkpoint not written: the latest checkpoint {path} does "
                                  f"not carry a valid signature for the key in {key.source}.")
        return checkpoint

    def verify(self, trail: AuditTrail, checkpoint_file: Path | None = None) -> VerifyReport:
        """The chain, checked link by link and then against the latest checkpoint (or the
        one given). One problem is reported: a broken link first, then a forged
        checkpoint, then a cut tail or rewritten history."""
        path = checkpoint_file or self.latest()
        if path is None:
            report = trail.verify()
            if not report.ok:
                return report
            return replace(report, problem_kind=ProblemKind.NO_CHECKPOINT,
                           warning=f"no checkpoint in {self.directory} yet: the tail of the "
                                   "chain is not anchored (one is written after every batch "
                                   "and revocation, or by `recon-console audit checkpoint`).")
        try:
            checkpoint = read_checkpoint_file(path)
        except ValueError as error:
            if checkpoint_file is not None:
                raise ConfigurationError(f"{path}: not a checkpoint file ({error}); make one "
                                         "with `recon-console audit checkpoint`.") from None
            checkpoint, damaged = None, str(error)
        about = _about(path, checkpoint)
        if checkpoint is None:
            report = trail.verify()
            return report if not report.ok else _forged(report, about, f"it is damaged "
                                                        f"({damaged})")
        key = self.key()
        if key is None:
            report = trail.verify()
            if not report.ok:
                return replace(report, checkpoint=about)
            return replace(report, ok=False, checkpoint=about,
                           problem_kind=ProblemKind.KEY_MISSING,
                           problem=f"the checkpoint key {self.key_file} is missing, so "
                                   f"checkpoint {path} cannot be checked: restore the key "
                                   "from backup.")
        if not signature_ok(checkpoint, key):
            report = trail.verify()
            if not report.ok:
                return replace(report, checkpoint=about)
            return _forged(report, about, f"its signature does not match the key in "
                                          f"{key.source}")
        return replace(trail.verify(checkpoint), checkpoint=about)


def _forged(report: VerifyReport, about: dict[str, Any], why: str) -> VerifyReport:
    return replace(report, ok=False, checkpoint=about,
                   problem_kind=ProblemKind.FORGED_CHECKPOINT,
                   problem=f"checkpoint {about['path']} is forged or damaged: {why}. It "
                           "cannot vouch for the chain; find out who changed it.")


def _about(path: Path, checkpoint: Checkpoint | None) -> dict[str, Any]:
    return {"path": str(path), "size": checkpoint.size if checkpoint else None,
            "created_at": checkpoint.created_at if checkpoint else None}


def _extends(trail: AuditTrail, previous: Checkpoint) -> str | None:
    """Why the chain does not extend `previous` (cheap: one indexed read), or None."""
    size = trail.checkpoint().size
    if size < previous.size:
        return (f"the chain has {size} entries but the latest checkpoint saw "
                f"{previous.size}: entries were cut from the end")
    if previous.size and trail.hash_at(previous.size) != previous.head_hash:
        return (f"entry {previous.size} no longer has the hash the latest checkpoint saw: "
                "history was rewritten")
    return None


def _file_name(checkpoint: Checkpoint) -> str:
    try:
        moment = datetime.fromisoformat(checkpoint.created_at)
        stamp = moment.strftime("%Y%m%dT%H%M%S%fZ")
    except ValueError:
        stamp = "0"
    return f"{_PREFIX}{checkpoint.size:012d}-{stamp}.json"
