"""``python -m memvae`` (and ``torchrun -m memvae train ...``)."""
import sys

from memvae.cli import main

sys.exit(main())
