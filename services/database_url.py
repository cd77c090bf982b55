"""`--db` / `RECON_DB` as a `postgresql://` URL (team mode), and where its password comes from.

A URL is seen by everyone on the machine (`ps`, shell history, logs), so one that carries a
password is refused. The password comes from the credentials file (`[database] password`), which
`provide_password` hands to the PostgreSQL store in memory (psycopg's `password=` keyword, never
a conninfo string), or from libpq itself: `~/.pgpass` / PGPASSFILE, or a PGSERVICE entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr

from services.credentials import load_section_secret

__all__ = ["SCHEMES", "check_database_url", "connect_kwargs", "display_url",
           "is_database_url", "load_database_password", "provide_password"]

SCHEMES = ("postgresql://", "postgres://")
_WHERE_PASSWORDS_GO = ("put the password in the credentials file ([database] password = "
                       "\"...\"), in ~/.pgpass (PGPASSFILE) or in a PGSERVICE entry")
# URL -> its password from the credentials file, for this process only (never written out).
_passwords: dict[str, SecretStr] = {}


def is_database_url(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith(SCHEMES)


def check_database_url(url: str) -> str:
    """The URL as given, if libpq can read it and it holds no password. The errors never
    repeat the URL: it may hold the very password they refuse."""
    from psycopg.conninfo import conninfo_to_dict
    if not url.startswith(SCHEMES):
        raise ValueError(f"a database URL must be postgresql://... ({url.split('://')[0]!r} is "
                         "not supported): or give a SQLite file path")
    try:
        params = conninfo_to_dict(url)
    except Exception:
        raise ValueError("the database URL is not one libpq can read: give "
                         "postgresql://USER@HOST[:PORT]/DATABASE (or "
                         "postgresql://USER@/DATABASE?host=/socket/dir)") from None
    if params.get("password") is not None or urlsplit(url).password is not None:
        raise ValueError("the database URL holds a password, which anyone on this machine "
                         f"could read in the process list: remove it, and {_WHERE_PASSWORDS_GO}")
    if not params.get("dbname") and not params.get("service"):
        raise ValueError("the database URL names no database: end it with /DATABASE, e.g. "
                         "postgresql://recon@db.example.com/recon")
    return url


def display_url(url: str) -> str:
    """The URL for the operator's eyes (the `Database: ...` line): any password cut out."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}@{host}"
    query = "&".join(pair for pair in parts.query.split("&")
                     if not pair.lower().startswith("password="))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def load_database_password(credentials: Path) -> SecretStr | None:
    """`[database] password` from the credentials file, with its usual checks (owner-only);
    None without the file or the entry (libpq's pgpass or service file may have it)."""
    if not credentials.exists():
        return None
    return load_section_secret(credentials, "database", "password")


def provide_password(url: str, credentials: Path) -> None:
    """Read the URL's password from the credentials file for `connect_kwargs` to hand over."""
    secret = load_database_password(credentials)
    if secret is None:
        _passwords.pop(url, None)
    else:
        _passwords[url] = secret


def connect_kwargs(url: str) -> dict[str, Any]:
    """Keyword arguments for psycopg.connect / ConnectionPool(kwargs=...) on `url`: the
    password from the credentials file if there is one (else libpq looks in pgpass/service)."""
    secret = _passwords.get(url)
    return {"password": secret.get_secret_value()} if secret is not None else {}
