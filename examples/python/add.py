"""python examples/python/add.py 2 3     (prints 5; any folder, no tasks.py needed)

Another application calls the demo's workers: a Celery app with Celery's default settings that
sends "tasks.add" by name. It does not import tasks.py, so it needs none of the workers' code
or dependencies; it must only agree with the workers on the broker, the queue (`celery`, as
Celery declares it by default), the serializer (JSON, Celery's default) and the result backend
(docs/other-applications.md).
"""
import argparse
import os

from celery import Celery

parser = argparse.ArgumentParser(description="Send tasks.add(X, Y) to the demo's workers.")
parser.add_argument("x", type=int)
parser.add_argument("y", type=int)
args = parser.parse_args()

app = Celery(broker=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@localhost:5672//"),
             backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/0"))
# Only when the workers use key prefixes (several demo runs sharing one Redis, as the tests do):
# the client must then read and write under the same ones.
if os.environ.get("CELERY_RESULT_KEYPREFIX"):
    app.conf.result_backend_transport_options = {
        "global_keyprefix": os.environ["CELERY_RESULT_KEYPREFIX"]}
if os.environ.get("CELERY_BROKER_PREFIX"):
    app.conf.broker_transport_options = {"global_keyprefix": os.environ["CELERY_BROKER_PREFIX"]}
# Only on the embedded stack (kombu's filesystem:// transport): the folders the workers use
# (celeryconfig.py), which a default app would look for in the current folder instead.
if os.environ.get("CELERY_FS_ROOT"):
    root = os.environ["CELERY_FS_ROOT"]
    app.conf.broker_transport_options = {
        "data_folder_in": os.path.join(root, "messages"),
        "data_folder_out": os.path.join(root, "messages"),
        "control_folder": os.path.join(root, "control")}

result = app.send_task("tasks.add", (args.x, args.y))
print(result.get(timeout=10))  # never wait without a timeout
