"""`python -m builder`: the command line (builder/cli.py)."""

from builder.cli import main

if __name__ == "__main__":
    main()
