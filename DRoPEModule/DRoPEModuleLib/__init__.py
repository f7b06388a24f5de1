"""Slicer-side helpers of the DRoPE module (no Qt, CTK or ``slicer.app`` imports at module level).

- ``paths``: where the DRoPE library, bundled weights and sample DWI are (installed extension or checkout).
- ``dependencies``: which Python requirements of the engine are missing.
- ``process``: engine command line, JSON progress protocol, the child process with callbacks.
- ``mrml_io``: DWI nodes <-> files, output maps/tables -> display-ready nodes (needs ``slicer``/MRML).
- ``results``: load a finished run's output folder into nodes on the input's grid (needs ``slicer``/MRML).

``paths``, ``dependencies`` and ``process`` are pure Python; import ``mrml_io``/``results`` explicitly.
"""
