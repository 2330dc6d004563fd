// aikido-run for jobs across hosts: the launcher of one host (--nnodes), and the start of every host's launcher from
// one host (-H, --hostfile).
#pragma once

#include "options.hpp"

namespace aikido::run {

/// --nnodes MIN[:MAX] --nproc-per-node K --store URL: joins the job and runs this host's workers.
///
/// With an etcd store the launchers find each other through etcd (launch::HostJob): version 0 once MIN hosts have
/// joined, a later host added to a running job, lost hosts removed; the workers follow the membership as in an
/// elastic job on one host (ElasticController, restricted to this host's workers). With a tcp:// store the set of
/// hosts is fixed: node 0 serves the store, every launcher publishes its workers per host there, and ranks follow
/// the node ranks. Returns aikido-run's exit status.
int run_host_job(const Options& options);

/// -np N -H h1:2,h2:2 (or --hostfile F): starts one launcher per host through --launch-command (ssh), each with
/// --nnodes, and relays their output. Without --store this aikido-run serves the job's store (a static job).
int run_from_one_host(const Options& options);

}  // namespace aikido::run
