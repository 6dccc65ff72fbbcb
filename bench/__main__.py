"""``python -m bench`` (what ``memserve bench`` runs): served throughput with and without memories."""

import logging
import sys

from bench.run import build_parser, main

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
sys.exit(main(build_parser().parse_args()) or 0)
