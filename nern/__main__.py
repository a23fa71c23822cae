import sys

from nern.cli import main

sys.exit(main())
