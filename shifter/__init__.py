"""Shifter's runtime for Slurm, by concern.  Arrows point one way: formats <- runtime <- launch.

- ``formats``: Shifter's file formats and request rules (pure, stdlib; everyone reads them);
- ``runtime``: the node's primitives that build, enter and remove container roots (root, in
  setupRoot, unsetupRoot and the SPANK hooks; the user, in the launcher);
- ``launch``: the ``shifter`` command (the user, on every task; bin/shifter is its C front);
- ``client``: the image gateway's client and ``shifterimg`` (users and the submission hook);
  uses formats only;
- ``packing``: the admin's udiImage and site module builder; uses formats only.

Here beside them only what all of them share and that imports nothing of them: ``errors``,
``record``, ``cmdline`` (the hot path's getopt and fast exit), ``buildinfo`` (written by make
install) and ``packtool`` (the ``python -m shifter.packtool`` command line).  gateway/, setuproot/,
unsetuproot/ and spank_plugin/ use this package; it never imports them.
"""
