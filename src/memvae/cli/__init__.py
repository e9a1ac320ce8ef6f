"""The command line (memvae ...)."""
