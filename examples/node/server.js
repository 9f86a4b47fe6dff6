// A cohort worker in plain Node.js: serves HTTP on the socket cohort (or
// systemd) passed at fd 3, in shared mode.
//
//   command = ["node", "/path/to/server.js"]
//   ready = "listening"   # the default: Node cannot send READY=1 to
//                         # NOTIFY_SOCKET without a native module, but
//                         # cohort sees the socket in its epoll set
//
// SIGTERM closes the listener and lets requests in flight finish.
'use strict';
const http = require('node:http');

if (process.env.LISTEN_PID !== String(process.pid) || !(Number(process.env.LISTEN_FDS) > 0)) {
  console.error('server.js: no socket passed (LISTEN_FDS/LISTEN_PID)');
  process.exit(1);
}
const worker = process.env.COHORT_WORKER ?? '-';
const gen = process.env.COHORT_GENERATION ?? '-';

const server = http.createServer((req, res) => {
  res.end(`hello from node worker ${worker} (pid ${process.pid}, gen ${gen})\n`);
});
server.listen({ fd: 3 }, () => {
  console.log(`node worker ${worker} (pid ${process.pid}) serving`);
});
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
