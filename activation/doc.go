// Package activation gives a program the listening sockets that systemd or
// cohort's dispatcher passed to it, and tells the service manager how it is
// doing. The same program works unchanged when started by plain systemd
// socket activation, by cohort in shared or round-robin mode, or by hand
// (it then listens on a fallback address).
//
// The whole life cycle of a worker:
//
//	files, err := activation.Inherit() // takes LISTEN_FDS, unsets LISTEN_*
//	if err != nil {
//		log.Fatal(err)
//	}
//	ln, err := files.Listen("http", "127.0.0.1:8080") // by LISTEN_FDNAMES name
//	if err != nil {
//		log.Fatal(err) // errors.Is(err, activation.ErrNoListener): wrong name
//	}
//	files.Close() // sockets nobody asked for
//	srv := &http.Server{Handler: handler}
//	// The first Accept sends READY=1; SIGTERM sends STOPPING=1 and
//	// shuts srv down gracefully, waiting up to 10 seconds.
//	if err := activation.Serve(context.Background(), srv, ln, 10*time.Second); err != nil {
//		log.Fatal(err)
//	}
//
// Under systemd or cohort's shared mode, Listen returns the inherited socket
// itself. In round-robin mode the dispatcher accepts connections and hands
// them over a channel (an fd named "cohort-rr"; see package
// activation/rr and docs/protocol.md); Listen then returns a listener that
// yields those connections, acknowledges them to the dispatcher and reports
// when they are closed.
//
// Ready, Status, Stopping and Notify speak sd_notify(3), with a deadline,
// to NOTIFY_SOCKET, which systemd, or cohort's dispatcher for each worker,
// provides.
//
// On the parent's side, Environ and Exec set up LISTEN_FDS, LISTEN_FDNAMES
// and LISTEN_PID for a child.
package activation
