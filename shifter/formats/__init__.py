"""Shifter's file formats and request rules: udiRoot.conf, image references, volume maps, image
metadata, the reuse marker, the hosts file, modules, the container environment, the command,
the launch plan, GPU recipes and the gateway's request binding.

Pure parsing and formatting, stdlib only, light to import (the launcher and the SPANK hooks import
them under ``python -I -S``); they touch no mount and need no privilege.  Imported by every other
part (runtime, launch, client, packing, setuproot, spank_plugin, gateway); imports nothing of them.
"""
