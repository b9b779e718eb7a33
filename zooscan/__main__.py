"""``python -m zooscan`` runs the command line."""

from zooscan.cli import main

main()
