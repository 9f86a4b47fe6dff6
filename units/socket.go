package units

import (
	"fmt"
	"strconv"
)

// Socket is the model of one socket unit: one listening stream socket with
// a name the service sees in LISTEN_FDNAMES.
type Socket struct {
	Name               string // unit name, "web.socket"
	Description        string
	SourcePath         string
	Service            string // the service it activates
	ListenStream       string // already in ListenStream= syntax
	FileDescriptorName string
	Backlog            int // 0: systemd's default
	ReusePort          bool
	NoDelay            bool
	KeepAlive          bool
	SocketUser         string
	SocketGroup        string
	SocketMode         uint32 // 0: systemd's default
	// Wants are the app's other socket units: starting the main socket
	// starts them all. PartOf makes a secondary socket follow the main
	// one on stop and restart.
	Wants  []string
	PartOf string
	// ExecStartPre and ExecStopPost are the argv of commands run before
	// the socket is bound and after it was closed, with full privileges
	// ("+"); nil renders none.
	ExecStartPre []string
	ExecStopPost []string
	ExtraUnit    []Option
	ExtraSocket  []Option
}

// Render returns the unit file. It fails for any name or value that
// options.put refuses (see the package doc).
func (s *Socket) Render() (File, error) {
	var o options
	o.add("Unit", "Description", s.Description)
	o.add("Unit", "Documentation", "man:cohort.toml(5)")
	o.add("Unit", "SourcePath", s.SourcePath)
	for _, w := range s.Wants {
		o.addUnit("Unit", "Wants", w)
	}
	if s.PartOf != "" {
		o.addUnit("Unit", "PartOf", s.PartOf)
	}
	o.addVerbatim("Unit", s.ExtraUnit)

	o.add("Socket", "ListenStream", s.ListenStream)
	o.add("Socket", "FileDescriptorName", s.FileDescriptorName)
	o.addUnit("Socket", "Service", s.Service)
	o.addIf(s.Backlog > 0, "Socket", "Backlog", strconv.Itoa(s.Backlog))
	o.addIf(s.ReusePort, "Socket", "ReusePort", yesNo(true))
	o.addIf(s.NoDelay, "Socket", "NoDelay", yesNo(true))
	o.addIf(s.KeepAlive, "Socket", "KeepAlive", yesNo(true))
	o.addIf(s.SocketUser != "", "Socket", "SocketUser", s.SocketUser)
	o.addIf(s.SocketGroup != "", "Socket", "SocketGroup", s.SocketGroup)
	o.addIf(s.SocketMode != 0, "Socket", "SocketMode", fmt.Sprintf("%04o", s.SocketMode))
	if len(s.ExecStartPre) > 0 {
		o.addCommand("Socket", "ExecStartPre", "+", s.ExecStartPre)
	}
	if len(s.ExecStopPost) > 0 {
		o.addCommand("Socket", "ExecStopPost", "+", s.ExecStopPost)
	}
	o.addVerbatim("Socket", s.ExtraSocket)
	return render(s.Name, generatedHeader(s.SourcePath), &o)
}
