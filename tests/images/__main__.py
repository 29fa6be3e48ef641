"""``python -m tests.images build``: build the local test images."""

import sys

from tests.images import build_busybox, build_model, build_pyservice

if sys.argv[1:] != ["build"]:
    sys.exit("usage: python -m tests.images build")
print(build_busybox())
print(build_model())
print(build_pyservice())
