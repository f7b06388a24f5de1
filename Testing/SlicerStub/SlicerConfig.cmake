# Stand-in for the Slicer CMake package, for configure-only checks of this extension without a Slicer build
# (Testing/test_slicer_packaging.py: cmake -S . -B build -DSlicer_DIR=Testing/SlicerStub).
# It provides the few variables and macros an extension's CMakeLists.txt uses, checks what Slicer would check
# (listed files exist, EXTENSION_* metadata set), installs the files with Slicer's layout and records them in
# ${CMAKE_BINARY_DIR}/SlicerStubManifest.txt (one "<name>;<SCRIPTS|RESOURCES>;<path from the source root>" per line).
set(Slicer_FOUND TRUE)
set(Slicer_VERSION "5.8.0")
set(Slicer_USE_PYTHONQT ON)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.8/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionGenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionCPack.cmake")
