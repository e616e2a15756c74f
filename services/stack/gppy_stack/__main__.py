"""``python -m gppy_stack``: run the stack service."""

from gppy_stack.service import main

main()
