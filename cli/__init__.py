"""The dbloom command line."""
