"""`python -m oppen.automations apply ...`: the command of cli.py, its exit status the process's."""

import sys

from oppen.automations.cli import main

sys.exit(main())
