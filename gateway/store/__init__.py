"""The gateway's image records: the Store interface and its SQLite and MongoDB backends.

A package because one interface has two full implementations and a lease-lock helper
that both share; each lives in its own module so a reader of one backend need not page
through the other.
"""
