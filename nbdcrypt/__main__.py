"""`python -m nbdcrypt` runs the command line."""

from nbdcrypt.cli import main

raise SystemExit(main())
