"""gppy: shared package of the 7DT imaging pipeline stack.

Holds only what crosses stage boundaries: configuration, message schemas, the NATS bus and
service runtime, FITS / naming / provenance helpers, the NumPy/CuPy array backend,
notifications, the command line and the sky simulator.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gppy-stack")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
