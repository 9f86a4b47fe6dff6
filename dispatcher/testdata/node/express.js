// An unchanged Express app: app.listen(PORT), as its README says.
const express = require('express');
const app = express();
app.get('/', (req, res) => res.send(`express worker ${process.env.COHORT_WORKER} pid ${process.pid} gen ${process.env.COHORT_GENERATION}\n`));
const server = app.listen(Number(process.env.PORT), () => console.log(`express listening on ${JSON.stringify(server.address())}`));
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
