"""The one exception type every user-facing failure is raised as.

Commands catch ShifterError at their entry point and print ``str(err)`` as a
single line on stderr, then exit non-zero: users never see a traceback.
"""


class ShifterError(Exception):
    """A failure the user or admin can act on; the message is one line naming the problem."""


# setupRoot's exit statuses for the two kinds of failure (the prolog hook acts on them)
REQUEST_FAILED = 1
NODE_FAILED = 2


class NodeError(ShifterError):
    """A failure of the node itself (loop devices, mounts, a broken udiRoot.conf), not of the request.

    setupRoot exits 2 on it, and the prolog then fails so that Slurm drains the node; a plain
    ShifterError (exit 1) is the user's request and only fails the job.
    """


class RequestError(ShifterError):
    """The job's request (image, volumes, modules, the image's own metadata) cannot be served.

    Raised where a request is validated, before anything is made on the node: setupRoot exits 1
    on it and the node stays in service, whatever the user or the image author put there.
    """
