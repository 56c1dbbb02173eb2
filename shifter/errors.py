"""The one exception type every user-facing failure is raised as.

Commands catch ShifterError at their entry point and print ``str(err)`` as a
single line on stderr, then exit non-zero: users never see a traceback.
"""


class ShifterError(Exception):
    """A failure the user or admin can act on; the message is one line naming the problem."""
