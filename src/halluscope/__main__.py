"""`python -m halluscope` runs the command line."""

from halluscope.cli import main

main()
