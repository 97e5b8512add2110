"""`python -m traces` is the `trace` command."""

from .cli import main

main()
