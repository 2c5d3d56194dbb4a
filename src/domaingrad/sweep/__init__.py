"""sweep: under construction."""
