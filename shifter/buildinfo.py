"""Where this installation lives: the repository's defaults, replaced by `make install`.

`make install` (scripts/install.py) writes its own copy of this module into the installed
package with the real PREFIX and the udiRoot.conf path under SYSCONFDIR, so root commands
find their config without reading any path from the environment.
"""

PREFIX = "/usr/local"
CONFIG_FILE = "/etc/shifter/udiRoot.conf"
