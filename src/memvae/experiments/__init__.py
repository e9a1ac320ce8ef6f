"""Experiments: compare and its scheduler, rate sweeps, the report and figures, cluster launchers."""
