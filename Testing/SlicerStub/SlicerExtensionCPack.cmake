# Stub of Slicer's extension packaging: nothing to package without Slicer.
