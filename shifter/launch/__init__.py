"""The ``shifter`` command that every task runs, as the user, without setuid.

``cli`` is the entry point (``shifter doctor`` or a launch); ``launcher`` finds and enters the job's
prepared environment, ``fresh`` builds a private one, ``execute`` holds the steps both share,
``doctor`` checks a node; ``fastlaunch.c`` is bin/shifter, the interpreter-free front that replays
the launch plan.  Imported by nothing but scripts/install.py's wrapper; uses formats, runtime and
the gateway client (an image that is not the job's needs a lookup).
"""
