"""What a notebook user touches (more lands here with the packaging issue).

- ``beep(ok=True)``: a short tone in the browser that shows the notebook (jupyter-beeper): high when a
  stage finished, low on an error. Without a Jupyter kernel (a script, a test, CI) it does nothing and
  prints nothing — jupyter-beeper alone would print ``<IPython.core.display.HTML object>`` there.

This module never imports torch.
"""

from __future__ import annotations


def in_kernel() -> bool:
    """True inside a Jupyter kernel (a browser may be listening), False in a script or a plain REPL."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def beep(ok: bool = True, seconds: float = 0.3) -> bool:
    """Play a tone in the notebook's browser (880 Hz when ``ok``, 220 Hz otherwise); returns whether a tone
    was sent. A missing jupyter-beeper or a headless run is a silent no-op."""
    if not in_kernel():
        return False
    try:
        from jupyter_beeper import Beeper
    except ImportError:
        return False
    Beeper().beep(frequency=880 if ok else 220, secs=seconds)
    return True
