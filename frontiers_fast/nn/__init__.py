"""Drop-in layers (filled in below)."""
