"""Making host binaries relocatable into containers: the udiImage sshd and site modules.

An admin's build-time tool (``python -m shifter.packtool``, run as root by ``make udiimage``);
setupRoot and localcluster read a few of its names.  Uses no other part of shifter but errors.
"""
