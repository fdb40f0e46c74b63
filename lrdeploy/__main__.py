"""`python -m lrdeploy` runs the CLI."""

from lrdeploy.cli import main

main()
