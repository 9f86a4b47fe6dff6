package main

import (
	"errors"
	"fmt"
	"net"

	"github.com/cohort-dev/cohort/activation"
)

// activated returns the first listener cohort (or systemd) passed and true:
// the inherited socket in shared mode, the round-robin listener in
// round-robin mode. It returns false when the process was not activated.
func activated() (net.Listener, bool, error) {
	files, err := activation.Inherit()
	if err != nil {
		return nil, true, fmt.Errorf("socket activation: %w", err)
	}
	if !files.Activated() {
		return nil, false, nil
	}
	defer files.Close() // the sockets not taken
	names := files.Names()
	if len(names) == 0 {
		return nil, true, errors.New("socket activation: no listener passed")
	}
	ln, err := files.Listen(names[0], "")
	if err != nil {
		return nil, true, fmt.Errorf("socket activation: %w", err)
	}
	return ln, true, nil
}
