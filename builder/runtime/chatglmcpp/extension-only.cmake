# Builds only what `pip install chatglm-cpp` needs from its sdist: the `_C` extension and what it links.
#
# chatglm-cpp's setup.py runs a bare `cmake --build .`, which compiles every target of the libraries it
# bundles (all of abseil, sentencepiece's trainer and command-line tools), though `_C` links a part of
# them. Given as CMAKE_ARGS="-DCMAKE_PROJECT_INCLUDE=<this file>", it runs after the top-level project()
# and, once the top-level CMakeLists is read, marks every target but `_C` EXCLUDE_FROM_ALL: `_C`'s
# dependencies still build, nothing else does. The extension is the same; the compile takes about 2/3
# of the CPU time. Debug info (-g, which chatglm.cpp adds) is left out of the Release flags too.
if(CMAKE_SOURCE_DIR STREQUAL PROJECT_SOURCE_DIR)
  function(chatglm_extension_only dir)
    get_property(targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
    foreach(target IN LISTS targets)
      if(NOT target STREQUAL "_C")
        set_property(TARGET "${target}" PROPERTY EXCLUDE_FROM_ALL TRUE)
      endif()
    endforeach()
    get_property(subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
    foreach(subdir IN LISTS subdirs)
      chatglm_extension_only("${subdir}")
    endforeach()
  endfunction()
  cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL chatglm_extension_only "${CMAKE_SOURCE_DIR}")
  string(APPEND CMAKE_CXX_FLAGS_RELEASE " -g0")
endif()
