"""``python -m conveyor`` runs the command-line tool."""

from conveyor.cli.main import main

if __name__ == "__main__":
    main()
