"""`python -m comparison PROGRAM ARGS...`, as benches/compare runs it.

PROGRAM is the path benches/compare was started by; it becomes argv[0], as when benches/compare
was a single Python file: argparse names it in the usage line and latest.json records it.
"""

import sys

from .main import main

sys.argv = sys.argv[1:]
sys.exit(main())
