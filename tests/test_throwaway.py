"""Throw-away vhosts and users on RabbitMQ through the management HTTP API alone, as on the
docker-compose broker (no local rabbitmqctl). The other tests use the default admin.

    pytest tests/test_throwaway.py
"""
from urllib.parse import urlparse

import pytest
from kombu import Connection, Exchange, Queue

import stack
from helpers import rabbit, require_rabbit, skip


def test_a_throwaway_vhost_and_user_work_and_are_removed_through_the_management_api():
    require_rabbit("throw-away vhosts are RabbitMQ's")
    broker = rabbit()[0]
    # (the other tests use the default admin: on this machine, rabbitmqctl for what they read)
    for way in ["management"]:
        try:
            admin = stack.rabbit_admin(broker, way=way)
        except stack.AdminUnavailable as exc:  # on CI, .ci/run enables the plugin
            skip(str(exc))
        with stack.throwaway_vhost(broker, admin=admin) as url:
            vhost = stack.vhost_of(url)
            with stack.throwaway_user(admin, vhost) as (user, password):
                parsed = urlparse(url)
                as_user = parsed._replace(
                    netloc=f"{user}:{password}@{parsed.hostname}:{parsed.port or 5672}").geturl()
                with Connection(as_user, connect_timeout=3) as conn:
                    Queue("probe", Exchange("probe", "direct"), routing_key="probe")(
                        conn.default_channel).declare()
                    conn.Producer().publish({"x": 1}, exchange="probe", routing_key="probe")
                stack.eventually(lambda: admin.queue_counts(vhost, "probe") == (1, 0),
                                 f"{way}: the message counted in its queue", 15)
                admin.delete_queue(vhost, "probe")
            with pytest.raises(stack.ServiceUnavailable):  # the user is gone
                stack.check_broker(as_user, timeout=3)
        with pytest.raises(stack.ServiceUnavailable):  # and the vhost too
            stack.check_broker(url, timeout=3)
