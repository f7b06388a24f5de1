"""Slicer-side helpers of the DRoPE module (no Qt, CTK or ``slicer.app`` imports at module level).

- ``paths``: where the DRoPE library, bundled weights and sample DWI are (installed extension or checkout).
- ``dependencies``: which Python requirements of the engine are missing; the first-run installation flow.
- ``process``: engine command line, JSON progress protocol, the child process tree with callbacks and cancel.
- ``mrml_io``: DWI nodes <-> files, output maps/tables -> display-ready nodes (needs ``slicer``/MRML).
- ``results``: load a finished run's output folder into nodes on the input's grid (needs ``slicer``/MRML).
- ``views``: the DRoPE layout, per-volume maps, attention overlay and colour legend (needs ``slicer``/MRML).
- ``logic``: ``DRoPELogic``, the module's Logic: export -> engine -> subject-hierarchy folder -> views.

``paths``, ``dependencies`` and ``process`` are pure Python; import the others explicitly.
"""
