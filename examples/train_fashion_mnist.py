#!/usr/bin/python3
"""Trains an MLP or a small CNN on Fashion-MNIST with Aikido's distributed optimizer, from Python.

    aikido-run -np 2 /usr/bin/python3 examples/train_fashion_mnist.py --model mlp --epochs 3

The Python twin of examples/train_fashion_mnist.cpp: the same flags, the same JSON line per epoch and worker, the same
elastic behaviour (--elastic under aikido-run --elastic). The data are the IDX gzip files of Debian's
dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist), or of --data DIR; no torchvision is needed.
"""
import argparse
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

import aikido
import aikido.torch
from fashion_mnist import load_split, make_model

EPILOG = (
    "Each worker prints one JSON line per epoch with the keys epoch, rank, workers, cluster_version, samples (this "
    "worker's), global_samples (all workers'), seconds (training time of the epoch), train_loss (mean over all "
    "workers' samples), test_accuracy (0 to 1), samples_per_second (this worker's), global_samples_per_second, "
    "batch_size (per worker), lr, strategy, model, steps, threads (LibTorch intra-op threads); global_samples counts "
    "the samples whose updates are in the model, so it equals the training set size in every epoch, resizes and lost "
    "workers included; and the gradient statistics as they stand at the end of the epoch: noise_scale, "
    "gradient_variance, snr (null until measured).")


def parse_args():
    p = argparse.ArgumentParser(
        description="Trains an MLP or a small CNN on Fashion-MNIST with Aikido (run under aikido-run for several "
                    "workers).", epilog=EPILOG)
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="mlp (784-512-256-10) or cnn (two 5x5 conv "
                   "layers)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step on each worker")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of SGD")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum of SGD")
    p.add_argument("--strategy", default="ssgd",
                   choices=["ssgd", "sma", "pair", "synchronous_sgd", "synchronous_averaging", "pair_averaging"],
                   help="ssgd (synchronous SGD), sma (synchronous model averaging) or pair (asynchronous pair "
                        "averaging)")
    p.add_argument("--seed", type=int, default=1, help="seed of the initial model and of the data order")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist",
                   help="folder with the Fashion-MNIST IDX gzip files")
    p.add_argument("--threads", type=int, default=0,
                   help="LibTorch intra-op threads per worker (default: OMP_NUM_THREADS, which aikido-run sets)")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: the whole "
                   "epoch)")
    p.add_argument("--policy", action="append", default=[],
                   help="adaptation policy NAME[:key=value,...] (repeatable): adaptive-batch, strategy-switch, "
                        "schedule, or one registered by the program")
    p.add_argument("--monitor", choices=["on", "off"], default="on",
                   help="gradient statistics and timing inside the step")
    p.add_argument("--target-accuracy", type=float, default=0,
                   help="stop after the first epoch whose test accuracy reaches this (0: train all epochs)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="with --target-accuracy: also test after every this many samples (all workers') inside an "
                        "epoch and stop as soon as the target is reached (0: test at the end of each epoch only)")
    p.add_argument("--elastic", action="store_true",
                   help="follow the job's membership (aikido-run --elastic): survive resizes and lost workers, new "
                        "workers get the model, optimizer state and data position")
    p.add_argument("--commit-every", type=int, default=10, help="elastic: commit the training state every this many "
                   "steps")
    p.add_argument("--skip-communication", action="store_true",
                   help="benchmarks only: every worker trains alone on its shard, without communication")
    args = p.parse_args()
    for name in ("epochs", "batch_size", "lr", "commit_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("threads", "max_steps", "eval_every"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    if not 0 <= args.momentum <= 1 or not 0 <= args.target_accuracy <= 1:
        p.error("--momentum and --target-accuracy are between 0 and 1")
    return args


def main():
    args = parse_args()
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    strategy = aikido.Strategy(args.strategy)
    if args.eval_every > 0 and args.target_accuracy <= 0:
        raise aikido.ConfigError("--eval-every needs --target-accuracy (it tests only to stop at the target)")
    if args.skip_communication and (args.policy or args.elastic):
        raise aikido.ConfigError("--policy and --elastic need communication: drop --skip-communication")

    # With --elastic the session owns the Peer, follows the job's membership and carries the training state across
    # resizes and lost workers; no collective may run before its first sync() (workers joining later start there).
    session = aikido.ElasticSession.from_env() if args.elastic else None
    peer = session.peer if session else aikido.default_peer()
    train_x, train_y = load_split(args.data, "train")
    test_x, test_y = load_split(args.data, "t10k")

    torch.manual_seed(args.seed)
    model = make_model(args.model)
    sgd = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    if not session:
        aikido.torch.broadcast_parameters(model.named_parameters(), root=0, peer=peer)
    opt = runner = None
    if not args.skip_communication:
        opt = aikido.torch.DistributedOptimizer(sgd, model.named_parameters(), strategy, peer=peer,
                                                monitor=args.monitor == "on", seed=args.seed,
                                                collective_setup=session is None)
        runner = aikido.torch.PolicyRunner(opt, args.batch_size, args.policy)
    sampler = aikido.torch.DistributedSampler(train_x.shape[0], peer=peer, seed=args.seed)

    # What the cluster agrees on; with --elastic registered, committed every --commit-every steps and at the end of
    # each epoch, and rolled back after a lost worker.
    progress = types.SimpleNamespace(step=0, epoch_samples=0, steps_in_epoch=0, epoch_begun=False)
    if session:
        runner.set_elastic_session(session)
        aikido.torch.register_state(session, model.named_parameters(), opt, sampler)
        session.register_object("progress", progress)
    if runner:
        runner.before_train()

    def evaluate():
        """Test accuracy: each worker scores its share of the test set; the counts are summed."""
        model.eval()
        correct = 0.0
        with torch.no_grad():
            n = test_x.shape[0]
            begin, end = n * peer.rank // peer.size, n * (peer.rank + 1) // peer.size
            for b in range(begin, end, 1000):
                stop = min(b + 1000, end)
                correct += model(test_x[b:stop]).argmax(1).eq(test_y[b:stop]).sum().item()
        total = torch.tensor([correct], dtype=torch.float64)
        peer.allreduce(total, "example/test-correct")
        model.train()
        return total.item() / test_x.shape[0]

    def recover(what):
        """After a lost worker: the survivors agree on the cluster without it and roll back to the last commit."""
        print(f"train_fashion_mnist.py: rank {session.rank}: recovering after: {what}", file=sys.stderr, flush=True)
        if opt:
            opt.finish_pending(after_failure=True)
        if session.recover() == aikido.SyncResult.removed:
            return False
        if opt:
            opt.on_cluster_change()
        return True

    printed_epoch = -1
    loss_sum, samples, test_seconds, reached = 0.0, 0, 0.0, -1.0
    start = time.perf_counter()
    test_every = max(args.eval_every, 1)
    done = False
    while not done and sampler.epoch < args.epochs:
        try:
            if session:
                if opt:
                    opt.finish_pending()
                result = session.sync(progress.step)
                if result == aikido.SyncResult.removed:
                    return 0
                if result == aikido.SyncResult.changed and opt:
                    opt.on_cluster_change()
            epoch = sampler.epoch
            if not progress.epoch_begun:
                if runner:
                    runner.before_epoch(epoch)
                model.train()
                loss_sum, samples, test_seconds, reached = 0.0, 0, 0.0, -1.0
                progress.steps_in_epoch = 0
                start = time.perf_counter()
                progress.epoch_begun = True
            position = sampler.position
            batch_now = runner.batch_size if runner else args.batch_size
            batch = None
            if args.max_steps == 0 or progress.steps_in_epoch < args.max_steps:
                batch = sampler.next_batch(batch_now)
            if batch is not None:
                if opt:
                    opt.zero_grad()
                else:
                    sgd.zero_grad()
                if batch:
                    index = torch.tensor(batch, dtype=torch.int64)
                    loss = F.cross_entropy(model(train_x.index_select(0, index)), train_y.index_select(0, index))
                    loss.backward()
                    loss_sum += loss.item() * len(batch)
                    samples += len(batch)
                if opt:
                    opt.step(len(batch))
                else:
                    sgd.step()
                samples_before = progress.epoch_samples
                progress.epoch_samples += sampler.position - position
                progress.step += 1
                progress.steps_in_epoch += 1
                if session and progress.step % args.commit_every == 0:
                    session.commit()
                if runner:
                    runner.after_step()
                    if runner.stopped:
                        done = True
                # A test whenever the epoch's samples pass a multiple of --eval-every (the same step everywhere).
                if (not done and args.eval_every > 0 and progress.epoch_samples // test_every > samples_before //
                        test_every and progress.epoch_samples < sampler.dataset_size):
                    test_start = time.perf_counter()
                    accuracy = evaluate()
                    if accuracy >= args.target_accuracy:
                        reached, done = accuracy, True
                    test_seconds += time.perf_counter() - test_start
                if not done:
                    continue

            # The end of the epoch.
            if runner:
                runner.after_epoch()
            seconds = time.perf_counter() - start - test_seconds
            accuracy = reached if reached >= 0 else evaluate()  # the model is unchanged since that test
            totals = torch.tensor([loss_sum, float(samples)], dtype=torch.float64)
            peer.allreduce(totals, "example/epoch-totals")
            slowest = torch.tensor([seconds], dtype=torch.float64)
            peer.allreduce(slowest, "example/epoch-seconds", op=aikido.ReduceOp.max)
            if printed_epoch < epoch:  # a recovery may repeat the end of an epoch; say it once
                metrics = opt.metrics if opt else aikido.TrainingMetrics()

                def statistic(v):
                    return v if aikido.TrainingMetrics.known(v) else None

                line = {
                    "epoch": epoch, "rank": peer.rank, "workers": peer.size, "cluster_version": peer.cluster_version,
                    "samples": samples, "global_samples": progress.epoch_samples, "seconds": seconds,
                    "train_loss": totals[0].item() / totals[1].item() if totals[1] > 0 else 0.0,
                    "test_accuracy": accuracy,
                    "samples_per_second": samples / seconds if seconds > 0 else 0.0,
                    "global_samples_per_second": totals[1].item() / slowest.item() if slowest.item() > 0 else 0.0,
                    "batch_size": runner.batch_size if runner else args.batch_size,
                    "lr": opt.lr if opt else args.lr,
                    "noise_scale": statistic(metrics.noise_scale),
                    "gradient_variance": statistic(metrics.gradient_variance),
                    "snr": statistic(metrics.snr),
                    "steps": progress.step,
                    "strategy": opt.strategy.name if opt else "none",
                    "model": args.model,
                    "threads": torch.get_num_threads(),
                }
                print(json.dumps(line), flush=True)
                printed_epoch = epoch
            if args.target_accuracy > 0 and accuracy >= args.target_accuracy:
                done = True
            if runner and runner.stopped:
                if peer.rank == 0:
                    print(f"train_fashion_mnist.py: stopped by policy: {runner.stop_reason}", file=sys.stderr)
                done = True
            sampler.set_epoch(epoch + 1)
            progress.epoch_samples = 0
            progress.epoch_begun = False
            if session:
                session.commit()
        except (aikido.PeerLostError, aikido.TimeoutError) as e:
            if not session:
                raise
            if not recover(str(e)):
                return 0
    if runner:
        runner.after_train()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (aikido.Error, RuntimeError, OSError) as e:
        print(f"train_fashion_mnist.py: {e}", file=sys.stderr)
        sys.exit(1)
