"""``attnstore serve``'s old home: the viewer is the package :mod:`attnstore.viewer`, whose names
this module re-exports (``from attnstore.serve import Viewer, make_server`` keeps working)."""

from __future__ import annotations

from attnstore.viewer import *  # exactly the names of attnstore.viewer.__all__
