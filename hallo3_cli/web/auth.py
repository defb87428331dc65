"""Who may see the page: only this machine without an auth file; any other address needs one (``user:password``
lines, not readable by others)."""

from __future__ import annotations

import os
import stat

from hallo3_cli.errors import InputError, UsageError

DEFAULT_HOST = "127.0.0.1"
#: Addresses that only this machine can reach: serving there needs no auth file.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_host(host: str, auth_file: str | os.PathLike | None) -> None:
    """Only a local address may be served without an auth file."""
    if host not in LOCAL_HOSTS and auth_file is None:
        raise UsageError(f"--host {host} opens the page to the network: give --auth-file FILE (lines user:password), "
                         f"or keep the default {DEFAULT_HOST}")


def read_auth_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``user:password`` lines (blank lines and ``#`` comments ignored; the password is everything after the
    first colon). Refused if others may read it (``chmod 600 FILE``), if a line is malformed, or if empty."""
    from hallo3_cli.fsutil import require_file

    path = require_file(path)
    mode = path.stat().st_mode
    if os.name == "posix" and mode & (stat.S_IROTH | stat.S_IWOTH):
        raise InputError(f"holds passwords but is readable or writable by others (mode {stat.S_IMODE(mode):o}); "
                         "run chmod 600 on it", path)
    users = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the auth file ({err})", path) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise InputError(f"line {number}: expected user:password", path)
        users.append((user.strip(), password))
    if not users:
        raise InputError("has no user:password line", path)
    return users
