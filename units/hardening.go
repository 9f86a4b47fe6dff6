package units

// hardening returns the sandboxing directives of a profile, and false for
// an unknown profile.
//
// "default" aims at a low `systemd-analyze security` exposure while running
// any interpreter unchanged: no MemoryDenyWriteExecute (V8 and other JITs
// need W+X pages), /proc still shows CPU information (Node's os.cpus()),
// the network families a server needs. "strict" adds what breaks JITs
// or is surprising for some programs. "none" adds nothing.
func hardening(profile string) ([]Option, bool) {
	base := []Option{
		{"NoNewPrivileges", "yes"},
		{"CapabilityBoundingSet", ""},
		{"PrivateTmp", "yes"},
		{"PrivateDevices", "yes"},
		{"DevicePolicy", "closed"},
		{"ProtectSystem", "strict"},
		{"ProtectHome", "read-only"},
		{"ProtectKernelTunables", "yes"},
		{"ProtectKernelModules", "yes"},
		{"ProtectKernelLogs", "yes"},
		{"ProtectControlGroups", "yes"},
		{"ProtectClock", "yes"},
		{"ProtectHostname", "yes"},
		{"ProtectProc", "invisible"},
		{"RestrictNamespaces", "yes"},
		{"RestrictRealtime", "yes"},
		{"RestrictSUIDSGID", "yes"},
		{"LockPersonality", "yes"},
		{"RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"},
		{"SystemCallArchitectures", "native"},
		{"SystemCallFilter", "@system-service"},
		// Not ~@resources: cpu_affinity needs sched_setaffinity.
		{"SystemCallFilter", "~@privileged"},
		{"SystemCallErrorNumber", "EPERM"},
		{"UMask", "0027"},
		{"KeyringMode", "private"},
	}
	switch profile {
	case "default":
		return base, true
	case "strict":
		return append(base,
			Option{"MemoryDenyWriteExecute", "yes"},
			Option{"ProcSubset", "pid"},
			Option{"PrivateUsers", "yes"},
			Option{"ProtectHome", "yes"},
		), true
	case "none":
		return nil, true
	}
	return nil, false
}
