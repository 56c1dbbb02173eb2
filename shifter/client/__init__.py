"""The image gateway's clients: the HTTP client, ``shifterimg``, and MUNGE credentials.

Run as users (``shifterimg``, the launcher's lookups) and in the submission hook; the gateway
imports ``munge`` to decode.  Stdlib only where the hot paths import them.  Uses shifter.formats only.
"""
