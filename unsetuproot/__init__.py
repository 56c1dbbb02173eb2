"""unsetuproot package."""
