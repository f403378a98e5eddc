"""A run's lifecycle around the training core: the exit-code table (`exit_codes`), the failures entry points
turn into those codes (`errors`), the one wrapper that does it (`exits`), and ownership of a run directory
(`rundir`)."""
