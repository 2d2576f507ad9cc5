"""`python -m dbloom.cli`."""

from .main import main

main()
