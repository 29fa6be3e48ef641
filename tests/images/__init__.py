"""Local test images (see ``busybox.py``)."""

from tests.images.busybox import BUSYBOX_IMAGE, build_busybox

__all__ = ["BUSYBOX_IMAGE", "build_busybox"]
