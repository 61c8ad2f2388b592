# Installs the library from BUILD_DIR into a scratch prefix, then builds and
# runs test/consumer against it with find_package, and again with
# add_subdirectory on SOURCE_DIR; with WITH_REDIS, the redis component too.
cmake_minimum_required(VERSION 3.25)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}")
  endif()
  message(STATUS "ok: ${ARGN}")
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)
run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})

set(common -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=Release)
if(LAUNCHER)
  list(APPEND common -DCMAKE_CXX_COMPILER_LAUNCHER=${LAUNCHER})
endif()

foreach(mode package subdirectory)
  set(bin ${WORK_DIR}/${mode})
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/test/consumer -B ${bin} ${common}
      -DRATELIMIT_MODE=${mode} -DCMAKE_PREFIX_PATH=${prefix} -DRATELIMIT_SOURCE_DIR=${SOURCE_DIR}
      -DRATELIMIT_WITH_REDIS=${WITH_REDIS})
  run(${CMAKE_COMMAND} --build ${bin})
  run(${bin}/consumer)
  if(WITH_REDIS)
    run(${bin}/consumer_redis)
  endif()
endforeach()
