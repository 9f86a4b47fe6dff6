// cohort's Node.js preload module: Node programs run unchanged under
// cohort. The dispatcher starts node workers with
//
//   NODE_OPTIONS="--require /usr/share/cohort/node-preload.js"
//
// (node_preload in cohort.toml(5)). A program that calls app.listen(3000)
// or server.listen(3000, '0.0.0.0') or listen({port: 3000}) on a port
// cohort was given then listens on the socket systemd (or `cohort run`)
// bound and cohort passed at fd 3…, as server.listen({fd: 3}) would: no
// second bind, no EADDRINUSE, a reload loses no connection. Matched by
// port only (the host argument is ignored: the socket's address is the
// app file's). A listen on a port cohort was not given, on a path, on a
// handle or an fd goes through untouched.
//
// Only public Node APIs: net.Server.prototype.listen (which http, https,
// http2, Express, Fastify, Koa and Nest all end in) is wrapped, and the
// wrapper calls the original with {fd}. It works only in the process the
// sockets were passed to (LISTEN_PID is its pid), so child processes and
// cluster workers the program forks are left alone; each passed fd is
// used once: a second listen on the same port in the same process (Fastify
// listening on both 127.0.0.1 and ::1 for "localhost") goes through
// untouched, and normally fails or binds elsewhere, as it would without
// cohort.
//
// Inputs: LISTEN_PID, LISTEN_FDS (systemd's sd_listen_fds protocol) and
// COHORT_LISTEN_PORTS, one port per passed fd in order ("-" for a unix
// socket), set by the dispatcher. Anything malformed disables the module
// with one line on stderr; it never throws at startup.
'use strict';

const net = require('node:net');

const PREFIX = 'cohort node preload:';
// SD_LISTEN_FDS_START: the first passed fd.
const FIRST_FD = 3;
// Bounds on what is read from the environment.
const MAX_FDS = 4096;

function parse(env, pid) {
  if (env.LISTEN_PID !== String(pid)) {
    return null; // not passed to this process (a child of the worker)
  }
  const n = Number(env.LISTEN_FDS);
  const ports = String(env.COHORT_LISTEN_PORTS ?? '').split(' ');
  if (!Number.isInteger(n) || n < 1 || n > MAX_FDS || ports.length !== n) {
    return { error: `LISTEN_FDS=${String(env.LISTEN_FDS).slice(0, 20)} does not match COHORT_LISTEN_PORTS=${String(env.COHORT_LISTEN_PORTS).slice(0, 80)}; listen() calls are left alone` };
  }
  const byPort = new Map();
  for (let i = 0; i < n; i++) {
    if (ports[i] === '-') continue;
    const p = Number(ports[i]);
    if (!/^[0-9]{1,5}$/.test(ports[i]) || p < 1 || p > 65535) {
      return { error: `COHORT_LISTEN_PORTS holds ${JSON.stringify(ports[i].slice(0, 20))}, not a port; listen() calls are left alone` };
    }
    if (!byPort.has(p)) byPort.set(p, FIRST_FD + i); // the first socket of a port wins
  }
  return { byPort };
}

// portOf returns the TCP port a listen() call asks for, or null when it
// asks for something else (a path, a handle, an fd, port 0, nothing).
function portOf(args) {
  let a = args[0];
  if (a !== null && typeof a === 'object') {
    if (a.fd !== undefined || a.handle !== undefined || a._handle !== undefined || a.path !== undefined) return null;
    a = a.port;
  }
  if (typeof a === 'string' && /^[0-9]{1,5}$/.test(a)) a = Number(a);
  if (typeof a !== 'number' || !Number.isInteger(a) || a < 1 || a > 65535) return null;
  return a;
}

function install() {
  const cfg = parse(process.env, process.pid);
  if (cfg === null) return;
  if (cfg.error) {
    process.stderr.write(`${PREFIX} ${cfg.error}\n`);
    return;
  }
  const { byPort } = cfg;
  const used = new Set();
  const warned = new Set();
  const listen = net.Server.prototype.listen;
  net.Server.prototype.listen = function cohortListen(...args) {
    const port = portOf(args);
    const fd = port === null ? undefined : byPort.get(port);
    if (fd === undefined || used.has(fd)) {
      if (port !== null && fd === undefined && !warned.has(port) && byPort.size > 0) {
        warned.add(port);
        process.stderr.write(`${PREFIX} listen on port ${port}, which cohort was not given (it was given ${[...byPort.keys()].join(', ')}): binding it as usual\n`);
      }
      return listen.apply(this, args);
    }
    used.add(fd);
    const opts = { fd };
    const first = args[0];
    if (first !== null && typeof first === 'object' && first.signal !== undefined) {
      opts.signal = first.signal;
    }
    const cb = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
    return cb === undefined ? listen.call(this, opts) : listen.call(this, opts, cb);
  };
}

install();
