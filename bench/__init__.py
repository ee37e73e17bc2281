"""The pieces of benchmark.py, one concern a module (benchmark.py is the runner to read first):

    worker.py     what runs in the workers: the benchmark's Celery app, its tasks, the progress
                  command, the raw kombu consumer (celery -A bench.worker worker)
    cases.py      the Celery cases: broker limit, defaults, tuned and each knob, chunks, latency,
                  cold start, and how each is sent and measured
    peers.py      Dramatiq, Huey and RQ doing the same trivial job
    run.py        isolation (throw-away vhost, Redis prefixes), starting and stopping a case's
                  workers, and a deadline on every wait
    profiling.py  CPU per message from /proc, and --profile (cProfile by area)
    report.py     summaries, targets, the JSON report and the printed tables
    cluster.py    the tuned case on a 3-node RabbitMQ cluster with quorum queues next to one
                  node with classic queues (benchmark.py --cluster, root only)

Nothing here is imported at package import: ``python -m bench.worker`` must be the only copy
of the workers' app in its process.
"""
