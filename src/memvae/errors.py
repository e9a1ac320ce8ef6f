"""The one exception type the command line turns into a one-line message."""


class MemvaeError(Exception):
    """A problem with the user's input (data, config, run directory, checkpoint).

    The command line prints ``error: <message>`` and exits with status 2, without a
    traceback unless ``--debug`` is given. Library code raises it instead of letting
    a deep stack trace explain a bad file or a typo.
    """
