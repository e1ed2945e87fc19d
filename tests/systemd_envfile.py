"""The independent parser of systemd's EnvironmentFile= format; it lives in the dev package
(dev/bootsecrets_dev/envfile.py) so the demo and the benchmark use it too."""

from bootsecrets_dev.envfile import InvalidName, parse

__all__ = ["InvalidName", "parse"]
