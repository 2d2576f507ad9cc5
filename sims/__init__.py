"""The network simulator: the real protocol cores in virtual time (issue 8)."""
