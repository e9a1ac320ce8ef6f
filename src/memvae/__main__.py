"""``python -m memvae`` (and ``torchrun -m memvae train ...``)."""
import sys

from memvae.cli.main import main

sys.exit(main())
