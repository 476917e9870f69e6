import sys

from ovss_fast.apps.cli import main

sys.exit(main())
