// Package bench is cohort's load benchmark: the same trivial HTTP hello app
// (hello/hello.js and the Go program in hello/) run alone, under Node's
// cluster (SCHED_RR and SCHED_NONE), PM2's cluster mode, a Go prefork
// SO_REUSEPORT server and cohort (shared, round-robin and reuseport modes),
// loaded by a Go load generator (Apply) with keep-alive and with a new
// connection per request; plus reloads under load (pm2 reload, a Node
// rolling restart, cohort's reload in shared and reuseport mode).
//
// Run measures every row in one go and returns a Report, which renders
// itself as markdown (Markdown), an SVG bar chart (SVG) and JSON, and
// evaluates the targets as ratios of rows of the same run. Rows
// that the cohort build cannot run yet (a mode, reload) say
// "not available in this build" and start measuring as soon as they work.
//
//	make bench     # go run ./bench/cmd/cohort-bench -out docs/bench
//
// It lives at the top of the repository, not under vmtests/, because it
// boots no container: every row runs on this machine, on 127.0.0.1.
//
// The load generator only targets 127.0.0.1 and stops by itself after the
// warm-up and the measured window. Every process the harness starts runs
// in a process group of its own and is stopped by that group's id at the
// end of its row, on failure and on Ctrl-C; PM2's daemon, which detaches
// itself, is stopped with `pm2 kill` on a private PM2_HOME and then by the
// pid it recorded.
package bench
