"""report: under construction."""
