"""Distribution strategies and deterministic execution for the recipes.

``--strategy mirrored`` trains on all local devices (GPUs, or one CPU) with
``tf.distribute.MirroredStrategy``; ``--strategy multiworker`` spans processes
or machines with ``tf.distribute.MultiWorkerMirroredStrategy``, each process
started with the same command and its own ``TF_CONFIG``::

    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}' python -m tfqkd.recipes.qkd --strategy multiworker ...

The recipe's ``batch_size`` is the *global* batch: every step consumes one
batch of that size split across all replicas, and each replica's loss is
scaled by the global batch (``tf.nn.compute_average_loss`` in
:class:`tfqkd.QKD`), so gradients, and hence training, equal a single-device
run with the same batch (up to float summation order; batch-norm statistics
are per replica).

``--deterministic`` makes two runs with the same seed produce bit-identical
weights and metrics: seeds for Python, NumPy and TensorFlow, deterministic op
kernels and single-threaded inter-op scheduling (see
:func:`enable_determinism` for the cost).
"""

import json
import os

from tfqkd.compat import keras, tf
from tfqkd.errors import TfqkdError

__all__ = ["STRATEGIES", "enable_determinism", "is_chief", "make_strategy", "shard_by_data", "worker_count"]

#: Values of ``--strategy``; "default" is the single-device default strategy.
STRATEGIES = ("default", "mirrored", "multiworker")


def enable_determinism(seed):
    """Same seed, same results: seeds every generator and forces deterministic kernels.

    * ``keras.utils.set_random_seed``: Python ``random``, NumPy and the
      TensorFlow global seed (weight initialisation, op-level seeds). With
      op determinism TensorFlow refuses an implicitly seeded global
      ``tf.random.Generator``; :class:`tfqkd.recipes.runner.Run` sets a
      seeded one.
    * ``tf.config.experimental.enable_op_determinism``: kernels that have a
      nondeterministic implementation (GPU scatter/segment reductions,
      cuDNN autotuning, ...) use a deterministic one or raise, and tf.data
      keeps element order.
    * one inter-op thread: independent ops run one after another, so the
      order in which stateful ops and reductions interleave cannot vary.
      Intra-op parallelism (threads inside one matmul or conv) stays, since
      Eigen splits work the same way for the same thread count.

    Cost, measured on a shared 2-core CPU (TF 2.21): the tiny digits QKD
    recipe takes 16.3-16.8 s plain vs 16.3-17.7 s deterministic (within
    noise, about +5 %); a DenseNet-21 training step on MNIST took 341 ms
    plain and 182-341 ms deterministic, i.e. no measurable slowdown on CPU,
    where TensorFlow's kernels are already deterministic. On GPUs the
    deterministic kernels (scatter, segment sums, cuDNN without autotuning)
    can cost considerably more; expect a slowdown there.

    Call it before TensorFlow executes any op and before creating the
    strategy (the recipes do); later the thread setting cannot change and is
    skipped.

    Args:
      seed: the integer seed.

    Returns:
      True if the inter-op thread setting took effect, False if TensorFlow
      had already started.
    """
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
        threads = True
    except RuntimeError:  # the runtime is initialised; the setting is fixed for this process
        threads = False
    # Flags and seeds only: nothing here starts the TensorFlow runtime, so a
    # MultiWorkerMirroredStrategy can still be created afterwards.
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(int(seed))
    return threads


def _tf_config():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise TfqkdError(
            "--strategy multiworker needs TF_CONFIG, e.g. "
            '\'{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}\''
        )
    try:
        config = json.loads(raw)
    except ValueError:
        raise TfqkdError("TF_CONFIG is not valid JSON") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise TfqkdError("TF_CONFIG needs a 'cluster' mapping and a 'task' mapping")
    workers = cluster.get("worker", [])
    if not isinstance(workers, list) or not all(isinstance(w, str) and ":" in w for w in workers):
        raise TfqkdError("TF_CONFIG cluster.worker must be a list of 'host:port' strings")
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster or isinstance(index, bool) or not isinstance(index, int):
        raise TfqkdError(f"TF_CONFIG task {task!r} does not name a member of the cluster")
    if not 0 <= index < len(cluster[kind]):
        raise TfqkdError(f"TF_CONFIG task index {index} is outside the {len(cluster[kind])} {kind}(s)")
    return config


def make_strategy(name="default"):
    """The ``tf.distribute`` strategy for ``--strategy``.

    Create it before any other TensorFlow work: collective ops are configured
    at start-up.

    Args:
      name: "default" (one device), "mirrored" (all local devices) or
        "multiworker" (processes described by ``TF_CONFIG``).

    Returns:
      a ``tf.distribute.Strategy``.

    Raises:
      TfqkdError: unknown name, or a missing/malformed ``TF_CONFIG``.
    """
    if name in (None, "default"):
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        _tf_config()
        # RING: plain gRPC all-reduce, available on CPU-only machines (NCCL needs GPUs).
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    raise TfqkdError(f"unknown strategy {name!r}; use {', '.join(STRATEGIES)}")


def worker_count(strategy):
    """Number of worker processes taking part in ``strategy`` (1 unless multi-worker)."""
    extended = getattr(strategy, "extended", None)
    return int(getattr(extended, "_num_workers", 1) or 1)


def is_chief(strategy):
    """Whether this process writes the run directory (one writer per run).

    The chief is the task of type "chief", or worker 0 when the cluster has
    no chief (TensorFlow's convention). Single-process strategies are always
    chief.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or worker_count(strategy) <= 1:
        return True
    kind, index = resolver.task_type, resolver.task_id
    if kind in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return kind == "worker" and index == 0 and not has_chief


def shard_by_data(dataset):
    """Shards ``dataset`` by element across workers (each global batch split between them).

    The default AUTO policy tries file sharding first, which does not apply to
    in-memory pipelines and logs a warning before falling back. With DATA
    every worker runs the same (seeded, identical) pipeline and keeps its
    part of each global batch, so the workers' parts together are exactly the
    batch a single process would see.

    Args:
      dataset: a batched ``tf.data.Dataset`` (batch = global batch size).

    Returns:
      the dataset with the DATA auto-shard policy.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
