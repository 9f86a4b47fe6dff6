// Command agent is the vmtests guest agent: started by a unit in a QEMU
// guest, it runs the harness's commands (see package vmagent). It is built
// on the host for every test run and reaches the guest through the
// read-only share, so the cached disk image does not depend on its code.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/cohort-dev/cohort/vmtests/internal/vmagent"
)

func main() {
	listen := flag.String("listen", "", "address to listen on (the guest's, reached through QEMU's forward)")
	tokenFile := flag.String("token-file", "", "file holding the token clients must send")
	flag.Parse()
	if err := serve(*listen, *tokenFile); err != nil {
		fmt.Fprintln(os.Stderr, "cohort-vmtest-agent:", err)
		os.Exit(1)
	}
}

func serve(addr, tokenFile string) error {
	if addr == "" || tokenFile == "" {
		return fmt.Errorf("need -listen and -token-file")
	}
	token, err := vmagent.ReadToken(tokenFile)
	if err != nil {
		return err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	log.SetFlags(0)
	log.Printf("listening on %s", l.Addr())
	s := &vmagent.Server{Token: token, Logf: log.Printf}
	return s.Serve(ctx, l)
}
