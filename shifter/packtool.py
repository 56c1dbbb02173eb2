"""``python -m shifter.packtool``: the admin's command line, kept at this module path.

The tool itself is shifter/packing/packtool.py; this name stays so that the documented command
(docs/modules-and-sshd.md, setupRoot's hint when the udiImage is missing) keeps working.
"""

from shifter.packing.packtool import main

if __name__ == "__main__":
    main()
