"""setuproot package."""
