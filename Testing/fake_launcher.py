"""A stand-in for Slicer's ``PythonSlicer`` launcher: runs ``python ARGS...`` as its own child and waits for it.

Like the CTK launcher it forwards no signal: SIGTERM ends the launcher (default action) and leaves the child
running, unless the whole process group is signalled. Its own process id goes to $FAKE_LAUNCHER_PID_FILE if set.
"""

import os
import subprocess
import sys

if os.environ.get("FAKE_LAUNCHER_PID_FILE"):
    with open(os.environ["FAKE_LAUNCHER_PID_FILE"], "w") as handle:
        handle.write(str(os.getpid()))
sys.exit(subprocess.call([sys.executable, *sys.argv[1:]]))
