"""Who may see the page: only this machine without an auth file; any other address needs one (``user:password``
lines, in a file only its owner may access)."""

from __future__ import annotations

import os
import stat

from hallo3_cli.errors import InputError, UsageError

DEFAULT_HOST = "127.0.0.1"
#: Addresses that only this machine can reach: serving there needs no auth file.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
#: An auth file is a short list of logins; anything longer is refused unread.
MAX_AUTH_FILE_BYTES = 1 << 20


def check_host(host: str, auth_file: str | os.PathLike | None) -> None:
    """Only a local address may be served without an auth file."""
    if host not in LOCAL_HOSTS and auth_file is None:
        raise UsageError(f"--host {host} opens the page to the network: give --auth-file FILE (lines user:password), "
                         f"or keep the default {DEFAULT_HOST}")


def read_auth_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``user:password`` lines (blank lines and ``#`` comments ignored; the password is everything after the
    first colon). Refused unless it is a regular file that only its owner may access (no permission bit for
    group or others: ``chmod 600 FILE``), if a line is malformed, or if empty. The checks are made on the open
    file (a FIFO is never waited on, a file swapped after the check is not the one read)."""
    from hallo3_cli.fsutil import require_file

    path = require_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise InputError(f"cannot read the auth file ({err.strerror})", path) from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InputError("is not a regular file (the auth file must be one)", path)
        if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InputError(f"holds passwords but its group or others have access to it (mode "
                             f"{stat.S_IMODE(info.st_mode):o}); only its owner may: run chmod 600 on it", path)
        data = file.read(MAX_AUTH_FILE_BYTES + 1)
    if len(data) > MAX_AUTH_FILE_BYTES:
        raise InputError(f"is larger than {MAX_AUTH_FILE_BYTES >> 10} KiB: not an auth file", path)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"cannot read the auth file ({err})", path) from None
    users = []
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
