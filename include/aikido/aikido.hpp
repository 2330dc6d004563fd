// Aikido: adaptive, elastic distributed training. Include this header to use the library.
#pragma once

#include <aikido/cluster_spec.hpp>
#include <aikido/elastic.hpp>
#include <aikido/errors.hpp>
#include <aikido/peer.hpp>
#include <aikido/store.hpp>
#include <aikido/types.hpp>
#include <aikido/work.hpp>
