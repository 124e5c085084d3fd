"""`python -m parity` runs the same CLI as the `parity` console command."""

from cli import main

main()
