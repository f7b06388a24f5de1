# Stub of Slicer's extension config generation: records the extension name for the packaging test.
file(WRITE "${CMAKE_BINARY_DIR}/SlicerStubExtension.txt" "${EXTENSION_NAME}\n")
