# The library uses only Boost's public API: no header under boost/<lib>/detail/
# and nothing from a boost::<lib>::detail namespace, in any header or source
# of the library (include/, src/). Private APIs change without notice between
# Boost releases (boost::uuids::detail::sha1::get_digest did), and some (Asio's
# scheduler) silently cover only some execution contexts.
#   cmake -DSOURCE_DIR=<repo> -P public_boost_api.cmake
cmake_minimum_required(VERSION 3.25)
file(GLOB_RECURSE files ${SOURCE_DIR}/include/*.hpp ${SOURCE_DIR}/src/*.cpp ${SOURCE_DIR}/src/*.hpp)
set(found "")
foreach(f IN LISTS files)
  file(STRINGS ${f} lines REGEX "boost/[a-z_0-9]+/detail/|boost::[a-z_0-9]+::detail|asio::detail::")
  foreach(line IN LISTS lines)
    string(STRIP "${line}" stripped)
    if(NOT stripped MATCHES "^//")
      string(APPEND found "\n  ${f}: ${stripped}")
    endif()
  endforeach()
endforeach()
list(LENGTH files n)
if(found)
  message(FATAL_ERROR "private Boost API used by the library:${found}")
endif()
message(STATUS "${n} files of the library use only public Boost API")
