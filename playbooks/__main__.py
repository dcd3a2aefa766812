import sys

from playbooks.cli import main

sys.exit(main())
