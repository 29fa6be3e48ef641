"""``python -m tests.images build``: build the local test images."""

import sys

from tests.images.busybox import build_busybox

if sys.argv[1:] != ["build"]:
    sys.exit("usage: python -m tests.images build")
print(build_busybox())
