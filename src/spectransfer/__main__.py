"""Allow `python -m spectransfer ...` (the demo runs its stages this way)."""

from spectransfer.cli import main

main()
