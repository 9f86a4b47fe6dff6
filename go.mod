module github.com/cohort-dev/cohort

go 1.26.0

require (
	github.com/BurntSushi/toml v1.6.0
	github.com/coreos/go-systemd/v22 v22.7.0
	golang.org/x/sys v0.50.0
	sigs.k8s.io/yaml v1.6.0
)

require (
	github.com/godbus/dbus/v5 v5.2.4 // indirect
	go.yaml.in/yaml/v2 v2.4.2 // indirect
)
