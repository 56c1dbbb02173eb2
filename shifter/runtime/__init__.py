"""The node runtime: syscalls, loop devices, mounts, descriptor-safe paths, user namespaces, the
container root, the job's directory and cgroup, GPU discovery and binds, and teardown.

Runs as root in the prolog and epilog (setupRoot, unsetupRoot, the SPANK hooks), which import it;
the launcher (shifter.launch) uses it as the user to enter a prepared root or build a private one.
Imports only shifter.formats and the shared base modules (errors, record).
"""
