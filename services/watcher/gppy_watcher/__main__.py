"""``python -m gppy_watcher``: run the watcher service."""

from gppy_watcher.service import main

main()
