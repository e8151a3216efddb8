"""`python -m ppml` runs the command line."""

from ppml.cli import main

main()
