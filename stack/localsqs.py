"""A local SQS-compatible server for run_demo.py --broker sqs and the tests: moto's server mode.

Owns: starting it as a process of a ``Processes`` group on a free loopback port, its broker
URL, and listing or deleting the queues of one run (a prefix) on any SQS endpoint.

moto keeps its queues in memory, so stopping the server removes them all. Celery reaches it as
it reaches Amazon: ``sqs://KEY:SECRET@127.0.0.1:PORT`` (any key and secret; with a host in the
URL kombu talks plain HTTP to it, without one it goes to Amazon over HTTPS).
"""
import importlib.util
import sys

from .processes import free_port, wait_for_port
from .services import MissingDriver, ServiceUnavailable

__all__ = ("start_local_sqs", "sqs_client", "sqs_queues", "delete_sqs_queues")
SERVER_PACKAGES = "pip install moto flask flask-cors"


def start_local_sqs(processes, name="sqs-server", timeout=30.0):
    """Start moto's SQS server in ``processes``; return its broker URL once it answers."""
    for module in ("moto", "flask", "flask_cors"):
        if importlib.util.find_spec(module) is None:
            raise MissingDriver(f"a local SQS server needs the Python package "
                                f"{module.replace('_', '-')}, which is not installed: "
                                f"{SERVER_PACKAGES}")
    port = free_port(0)
    processes.start(name, [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                           "-p", str(port)])
    if not wait_for_port("127.0.0.1", port, timeout):
        raise ServiceUnavailable(f"the local SQS server (moto) did not listen on port {port} "
                                 f"within {timeout:.0f}s:\n{processes.log_tail(name)}")
    return f"sqs://demo:demo@127.0.0.1:{port}"


def sqs_client(url, region="us-east-1"):
    """A boto3 SQS client for the endpoint and credentials of a ``sqs://`` broker URL."""
    from urllib.parse import unquote, urlparse

    import boto3
    parsed = urlparse(url)
    endpoint = f"http://{parsed.hostname}:{parsed.port}" if parsed.hostname else None
    return boto3.client("sqs", region_name=region, endpoint_url=endpoint,
                        aws_access_key_id=unquote(parsed.username or "") or None,
                        aws_secret_access_key=unquote(parsed.password or "") or None)


def sqs_queues(url, prefix):
    """The URLs of the queues whose name starts with ``prefix``."""
    return sqs_client(url).list_queues(QueueNamePrefix=prefix).get("QueueUrls", [])


def delete_sqs_queues(url, prefix):
    """Delete every queue whose name starts with ``prefix`` (a run's); return how many."""
    client, queues = sqs_client(url), sqs_queues(url, prefix)
    for queue in queues:
        client.delete_queue(QueueUrl=queue)
    return len(queues)
