"""Development helpers for bootsecrets: a dev OpenBao server set up as a user would, the
installed programs the demo and the benchmark drive, and an independent parser of rendered
env files. Installed (editable) by scripts/dev-setup; never part of the image."""

__version__ = "0"
