"""pytest wiring (filled in by the walking skeleton)."""
