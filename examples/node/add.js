// node add.js 2 3      (in examples/node, after `npm ci`; prints 5)
//
// Calls the demo's workers from Node.js with celery-node, a client of Celery's message
// protocol: it sends "tasks.add" by name to the queue `celery` and reads the result from Redis.
// Same environment variables as the Python side: CELERY_BROKER_URL (amqp:// or redis://),
// CELERY_RESULT_BACKEND (redis://), and the key prefixes of celeryconfig.py when set.
const celery = require("celery-node");

const broker = process.env.CELERY_BROKER_URL || "amqp://guest:guest@localhost:5672//";
const backend = process.env.CELERY_RESULT_BACKEND || "redis://localhost:6379/0";
const [x, y] = process.argv.slice(2, 4).map(Number);
const seconds = 10;

// Nothing hangs: celery-node and its Redis client retry a missing service for ever.
const deadline = setTimeout(() => {
  console.error(`no result within ${seconds} s: is a worker running, and do the broker ` +
                `(${broker.replace(/:[^:@/]*@/, ":**@")}) and Redis answer?`);
  process.exit(1);
}, seconds * 1000);

const client = celery.createClient(broker, backend);
// celeryconfig.py's global_keyprefix options, which ioredis calls keyPrefix
if (process.env.CELERY_BROKER_PREFIX) {
  client.conf.CELERY_BROKER_OPTIONS = { keyPrefix: process.env.CELERY_BROKER_PREFIX };
}
if (process.env.CELERY_RESULT_KEYPREFIX) {
  client.conf.CELERY_BACKEND_OPTIONS = { keyPrefix: process.env.CELERY_RESULT_KEYPREFIX };
}

// One line, exit 1, whatever fails. RabbitMQ refusing the queue (PRECONDITION_FAILED: `celery`
// declared with other arguments, by an older version of the demo) closes the channel with an
// 'error' event that celery-node does not listen to: Node would crash with a stack trace.
function fail(error) {
  const hint = /PRECONDITION.FAILED/.test(error.message) ? " (see docs/troubleshooting.md)" : "";
  console.error(`tasks.add failed: ${error.message}${hint}`);
  process.exit(1);
}
process.on("unhandledRejection", fail);
if (client.broker.connect) {  // amqp://: amqplib's connection and channel, as promises
  client.broker.connect.then((connection) => connection.on("error", fail), fail);
  client.broker.channel.then((channel) => channel.on("error", fail), fail);
}

client.createTask("tasks.add").applyAsync([x, y])
  .get(seconds * 1000)
  .then((result) => {
    console.log(result);
    clearTimeout(deadline);
    return client.disconnect();
  })
  .catch(fail);
