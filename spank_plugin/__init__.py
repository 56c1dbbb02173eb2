"""spank_plugin package."""
