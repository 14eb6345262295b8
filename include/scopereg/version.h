// scopereg/version.h
//
// The library's version, semantic versioning: SCOPEREG_VERSION_MAJOR changes break the API;
// while MAJOR is 0, MINOR changes may. This header is the single source of the version:
// CMake's project() and the installed package version file are read from it.

#ifndef SCOPEREG_VERSION_H_
#define SCOPEREG_VERSION_H_

#define SCOPEREG_VERSION_MAJOR 0
#define SCOPEREG_VERSION_MINOR 1
#define SCOPEREG_VERSION_PATCH 0
#define SCOPEREG_VERSION_STRING "0.1.0"

// SCOPEREG_VERSION: MAJOR * 10000 + MINOR * 100 + PATCH, for #if comparisons.
#define SCOPEREG_VERSION \
  (SCOPEREG_VERSION_MAJOR * 10000 + SCOPEREG_VERSION_MINOR * 100 + SCOPEREG_VERSION_PATCH)

#endif  // SCOPEREG_VERSION_H_
