"""Username and password policy, shared by auth requests and game events.

See docs/protocol.md, "Accounts".
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, StringConstraints

USERNAME_PATTERN = r"^[A-Za-z0-9_.\-]{3,32}$"
PASSWORD_MIN_BYTES = 8
PASSWORD_MAX_BYTES = 72  # bcrypt ignores everything after byte 72

_USERNAME_RE = re.compile(USERNAME_PATTERN)

# Lockout: five failures for one username within 15 minutes lock it for 15 minutes.
LOCKOUT_MAX_FAILURES = 5
LOCKOUT_WINDOW_S = 15 * 60
LOCKOUT_DURATION_S = 15 * 60

TOKEN_BYTES = 32
TOKEN_TTL_S = 24 * 60 * 60


def username_key(username: str) -> str:
    """The case-insensitive identity of a username (unique in the database, used in keys)."""
    return username.lower()


def is_valid_username(username: str) -> bool:
    """Whether `username` follows the policy: 3-32 of `A-Z a-z 0-9 _ . -`."""
    return bool(_USERNAME_RE.fullmatch(username))


def _check_password(password: str) -> str:
    size = len(password.encode("utf-8"))
    if not PASSWORD_MIN_BYTES <= size <= PASSWORD_MAX_BYTES:
        raise ValueError(
            f"password must be {PASSWORD_MIN_BYTES}-{PASSWORD_MAX_BYTES} bytes of UTF-8, got {size}"
        )
    return password


Username = Annotated[str, StringConstraints(pattern=USERNAME_PATTERN)]
Password = Annotated[str, AfterValidator(_check_password)]
