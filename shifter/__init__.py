"""shifter package."""
