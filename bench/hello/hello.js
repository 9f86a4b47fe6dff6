// The benchmark's Node.js hello app: one file for every Node row.
//
// Each response says which worker answered ("node worker <id> pid <pid>"),
// so the load generator can count requests per worker.
//
//   node hello.js                      alone, on BENCH_ADDR (127.0.0.1:8080)
//   BENCH_CLUSTER=N node hello.js      a cluster primary with N workers;
//                                      NODE_CLUSTER_SCHED_POLICY=rr|none
//                                      picks Node's scheduler. SIGHUP rolls
//                                      the workers: one new worker per slot,
//                                      wait for 'listening', then disconnect
//                                      the old one.
//   pm2 start hello.js -i N            PM2 cluster mode (NODE_APP_INSTANCE)
//   cohort run ... -- node hello.js    shared or reuseport mode: the socket
//                                      at fd 3 (LISTEN_FDS, LISTEN_PID =
//                                      own pid); in reuseport mode each
//                                      worker's own SO_REUSEPORT socket
'use strict';

const cluster = require('node:cluster');
const http = require('node:http');

const addr = process.env.BENCH_ADDR || '127.0.0.1:8080';
const sep = addr.lastIndexOf(':');
const host = addr.slice(0, sep);
const port = Number(addr.slice(sep + 1));

if (cluster.isPrimary && process.env.BENCH_CLUSTER) {
  primary(Number(process.env.BENCH_CLUSTER));
} else {
  serve();
}

function workerID() {
  if (process.env.COHORT_WORKER !== undefined) return process.env.COHORT_WORKER;
  if (process.env.NODE_APP_INSTANCE !== undefined) return process.env.NODE_APP_INSTANCE;
  if (process.env.BENCH_SLOT !== undefined) return process.env.BENCH_SLOT;
  return '-';
}

function serve() {
  const body = `node worker ${workerID()} pid ${process.pid}\n`;
  const headers = {
    'Content-Type': 'text/plain',
    'Content-Length': Buffer.byteLength(body),
  };
  const closing = { ...headers, Connection: 'close' };
  // Once the server is closing (reload, stop), busy keep-alive connections
  // are told to go away after their current response, as Go's Shutdown does.
  const server = http.createServer((req, res) => {
    res.writeHead(200, server.listening ? headers : closing);
    res.end(body);
  });
  server.keepAliveTimeout = 30000;
  const activated =
    Number(process.env.LISTEN_FDS) > 0 && Number(process.env.LISTEN_PID) === process.pid;
  if (activated) {
    server.listen({ fd: 3 });
  } else {
    server.listen(port, host);
  }
  server.on('listening', () => {
    console.log(`worker ${workerID()} pid ${process.pid} listening${activated ? ' on fd 3' : ''}`);
  });
  server.on('error', (err) => {
    console.error(`worker ${workerID()} pid ${process.pid}: ${err.message}`);
    process.exit(1);
  });
  const stop = () => server.close(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

function primary(n) {
  const slots = new Array(n);
  let generation = 1;
  let reloading = false;
  let pending = false;
  let stopping = false;

  function fork(slot) {
    const w = cluster.fork({ BENCH_SLOT: String(slot) });
    w.slot = slot;
    w.replaced = false;
    slots[slot] = w;
    return w;
  }

  cluster.on('exit', (w, code, signal) => {
    if (!w.replaced && slots[w.slot] === w && !stopping) {
      console.error(`worker ${w.slot} pid ${w.process.pid} died (${signal || code}), restarting`);
      fork(w.slot);
    }
  });

  async function reload() {
    if (reloading) {
      pending = true;
      return;
    }
    reloading = true;
    generation++;
    const start = Date.now();
    for (let slot = 0; slot < n; slot++) {
      const old = slots[slot];
      const next = fork(slot);
      await new Promise((resolve) => next.once('listening', resolve));
      if (old) {
        old.replaced = true;
        const gone = new Promise((resolve) => old.once('exit', resolve));
        old.disconnect(); // closes its server: in-flight requests finish
        const timer = setTimeout(() => old.process.kill('SIGKILL'), 10000);
        await gone;
        clearTimeout(timer);
      }
    }
    console.log(`reload done gen=${generation} in ${Date.now() - start} ms`);
    reloading = false;
    if (pending) {
      pending = false;
      reload();
    }
  }

  function stop() {
    stopping = true;
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGTERM');
    setTimeout(() => process.exit(0), 2000).unref();
    cluster.on('exit', () => {
      if (Object.keys(cluster.workers).length === 0) process.exit(0);
    });
  }

  process.on('SIGHUP', reload);
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  const policy = cluster.schedulingPolicy === cluster.SCHED_RR ? 'rr' : 'none';
  console.log(`primary pid ${process.pid}: ${n} workers, scheduling ${policy}`);
  for (let slot = 0; slot < n; slot++) fork(slot);
}
