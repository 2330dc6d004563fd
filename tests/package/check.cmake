# One step of the package test (tests/package/CMakeLists.txt), run with cmake -P:
#   install        installs BUILD_DIR into WORK_DIR/prefix
#   core           builds the consumer's aikido::aikido worker against that prefix and runs it
#   torch          the same with its aikido::torch worker too (LibTorch is found)
#   torch_missing  the consumer links aikido::torch while LibTorch cannot be found: the configuration must fail and
#                  say "aikido::torch needs LibTorch; set Torch_DIR" (or, for an installation built without LibTorch,
#                  that aikido::torch is not part of it)
cmake_minimum_required(VERSION 3.22)
set(prefix ${WORK_DIR}/prefix)

function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "${what} failed (${status}):\n${out}\n${err}")
  endif()
endfunction()

# Configures the consumer in WORK_DIR/<name> with `args`; the status and output go to the caller's variables.
function(configure_consumer name status_var output_var)
  file(REMOVE_RECURSE ${WORK_DIR}/${name})
  execute_process(COMMAND ${CMAKE_COMMAND} -S ${CONSUMER_DIR} -B ${WORK_DIR}/${name} -DCMAKE_PREFIX_PATH=${prefix}
                          -DCMAKE_CXX_COMPILER=${CXX_COMPILER} ${ARGN}
                  RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  set(${status_var} ${status} PARENT_SCOPE)
  set(${output_var} "${out}\n${err}" PARENT_SCOPE)
endfunction()

if(STEP STREQUAL "install")
  file(REMOVE_RECURSE ${WORK_DIR})
  run("cmake --install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})
elseif(STEP STREQUAL "core" OR STEP STREQUAL "torch")
  set(with_torch OFF)
  if(STEP STREQUAL "torch")
    set(with_torch ON)
  endif()
  configure_consumer(${STEP} status output -DWITH_TORCH=${with_torch})
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "configuring the consumer failed:\n${output}")
  endif()
  run("building the consumer" ${CMAKE_COMMAND} --build ${WORK_DIR}/${STEP} -j2)
  # Alone (no aikido-run), each worker is a cluster of one rank.
  run("the aikido::aikido worker" ${WORK_DIR}/${STEP}/worker)
  if(with_torch)
    run("the aikido::torch worker" ${WORK_DIR}/${STEP}/torch_worker)
  endif()
elseif(STEP STREQUAL "torch_missing")
  configure_consumer(${STEP} status output -DWITH_TORCH=ON -DCMAKE_DISABLE_FIND_PACKAGE_Torch=ON)
  if(status EQUAL 0)
    message(FATAL_ERROR "linking aikido::torch without LibTorch configured without an error:\n${output}")
  endif()
  string(REGEX REPLACE "[ \n]+" " " flat "${output}")
  if(NOT flat MATCHES "aikido::torch needs LibTorch; set Torch_DIR" AND
     NOT flat MATCHES "aikido::torch is not part of this installation")
    message(FATAL_ERROR "the error does not say that aikido::torch needs LibTorch:\n${output}")
  endif()
  if(NOT flat MATCHES "Targets that link aikido::torch: torch_worker")
    message(FATAL_ERROR "the error does not name the target that links aikido::torch:\n${output}")
  endif()
else()
  message(FATAL_ERROR "unknown STEP '${STEP}'")
endif()
