"""``python -m gppy_subtract``: run the subtract service."""

from gppy_subtract.service import main

main()
