"""`python -m appliance.cli`."""

from . import main

main()
