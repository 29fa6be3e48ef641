"""Local test images (see ``busybox.py``, ``model.py``, ``pyservice.py``)."""

from tests.images.busybox import BUSYBOX_IMAGE, build_busybox
from tests.images.model import MODEL_IMAGE, build_model
from tests.images.pyservice import PYSERVICE_IMAGE, build_pyservice

__all__ = [
    "BUSYBOX_IMAGE",
    "MODEL_IMAGE",
    "PYSERVICE_IMAGE",
    "build_busybox",
    "build_model",
    "build_pyservice",
]
