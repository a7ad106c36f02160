"""App folders: files an app loads as they are (app/base.py), one module per client."""

from .base import APP_DIR, APP_FILE, APPS, App, Built, build_app  # noqa: F401

# Each module registers its App by subclassing; one missing its client library is still importable (the import of
# the client happens when it runs).
from . import coreml, mediapipe, onnx  # noqa: E402,F401
