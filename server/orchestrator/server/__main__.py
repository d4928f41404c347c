"""`python -m orchestrator.server [FLAGS]` is `orchestrator serve [FLAGS]`."""

import sys

from orchestrator.server.serve import main

main(sys.argv[1:])
