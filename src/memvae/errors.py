"""The one exception type the command line turns into a one-line message."""


class MemvaeError(Exception):
    """A problem with the user's input (data, config, run directory, checkpoint).

    The command line prints ``error: <message>`` and exits with status 2, without a
    traceback unless ``--debug`` is given. Library code raises it instead of letting
    a deep stack trace explain a bad file or a typo.
    """


def os_error(exc: OSError, doing: str | None = None) -> MemvaeError:
    """An OSError of the file system (no permission, a missing or read-only folder, a full
    disk) as the one-line error: ``could not DOING (REASON)``, or ``PATH: REASON`` when
    ``doing`` is not known. Such an error is about the machine the user runs on, not a
    bug, so it is reported the way bad input is (``error: ...``, status 2)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    path = "" if exc.filename is None else str(exc.filename)
    if exc.filename2 is not None:
        path += f" -> {exc.filename2}"
    if doing is None:
        return MemvaeError(f"{path}: {reason}" if path else reason)
    if path and path not in doing:  # a file inside what was being done: name it
        reason = f"{path}: {reason}"
    return MemvaeError(f"could not {doing} ({reason})")
