"""Offline stand-in for rules_cc: the native rules, re-exported."""

cc_binary = native.cc_binary
cc_import = native.cc_import
cc_library = native.cc_library
cc_proto_library = native.cc_proto_library
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
objc_library = native.objc_library
cc_toolchain_suite = native.cc_toolchain_suite
