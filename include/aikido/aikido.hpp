// Aikido: adaptive, elastic distributed training. Include this header to use the library.
#pragma once

#include <aikido/errors.hpp>
#include <aikido/peer.hpp>
#include <aikido/store.hpp>
#include <aikido/types.hpp>
#include <aikido/work.hpp>
