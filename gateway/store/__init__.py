"""The gateway's image records: the Store interface and its SQLite and MongoDB backends.

A package because one interface has two full implementations and a lease-lock helper
that both share; each lives in its own module so a reader of one backend need not page
through the other.  base.py is the interface (what the gateway's other modules import),
backend.py opens the store a configuration names; sqlite.py, mongo.py and lease.py are
imported by them only.  Nothing here runs as root.
"""
