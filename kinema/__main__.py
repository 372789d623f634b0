"""`python -m kinema ...`, and `torchrun --nproc_per_node=N -m kinema generate ...` for parallel runs."""

import sys

from kinema.cli.main import main

sys.exit(main())
