"""Pure functions turning test records into the terminal, JSON and HTML reports."""
