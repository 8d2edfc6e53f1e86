"""Errors that the CLI turns into one line and an exit code (1 = failed, 2 = bad usage), and what they may show."""

import urllib.parse


class VaedistError(Exception):
    """Something went wrong that is not a bug: the CLI prints the message alone and exits 1."""

    exit_code = 1


class UsageError(VaedistError):
    """The user asked for something invalid (a flag, a config value, a path): exit 2."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name): what a one-line error quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def redact_url(url: str) -> str:
    """``http://user:secret@host`` -> ``http://user:***@host``: URLs go to the console, logs and job metadata."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
