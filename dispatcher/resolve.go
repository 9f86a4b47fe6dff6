package dispatcher

import (
	"github.com/cohort-dev/cohort/generator/config"
)

// ServicePATH is the PATH systemd gives a system service that sets none
// (systemd.exec(5), "Environment Variables in Spawned Processes"); /sbin
// and /bin are the same directories on a merged-/usr system and the
// fallback on others.
const ServicePATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// ResolveCommand finds app's program the way the dispatcher will when it
// starts with the environment inherited: PATH from the app's environment
// and environment files, else from inherited; a name with a slash as it
// is. A service runs in "/" unless working_directory says otherwise. It
// returns the path, or an error naming what is missing: an environment
// file that cannot be read, or a program that is not there or not
// executable (wrapping fs.ErrNotExist or fs.ErrPermission when it is one
// of those).
func ResolveCommand(app *config.App, inherited []string) (string, error) {
	env, err := baseEnv(inherited, app)
	if err != nil {
		return "", err
	}
	dir := app.WorkingDirectory
	if dir == "" {
		dir = "/"
	}
	return lookPath(app.Command[0], envValue(env, "PATH"), dir)
}
