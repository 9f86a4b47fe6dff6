// An unchanged Fastify app: fastify.listen({port}), host left to
// Fastify's default ("localhost": 127.0.0.1, and ::1 when it can).
//
// return503OnClosing: false, because Fastify's default answers 503 to a
// request that arrives on a connection accepted just before close(): a
// graceful stop that serves what it accepted must not.
const fastify = require('fastify')({ return503OnClosing: false });
fastify.get('/', async () => `fastify worker ${process.env.COHORT_WORKER} pid ${process.pid} gen ${process.env.COHORT_GENERATION}\n`);
fastify.listen({ port: Number(process.env.PORT) }).then((a) => console.log(`fastify listening on ${a}`));
process.on('SIGTERM', () => fastify.close().then(() => process.exit(0)));
