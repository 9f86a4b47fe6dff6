package dispatcher

import (
	"fmt"
	"os"

	"github.com/cohort-dev/cohort/appfile"
)

// ServicePATH is the PATH systemd gives a system service that sets none
// (systemd.exec(5), "Environment Variables in Spawned Processes"); /sbin
// and /bin are the same directories on a merged-/usr system and the
// fallback on others.
const ServicePATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// prepareCommand is what a generation of workers needs before any of them
// is forked: the workers' base environment (inherited, os.Environ() when
// nil, with the app's environment and environment files), a check that
// the command can be spawned, and the program's path, looked up on that
// environment's PATH from the working directory (the dispatcher's own when
// the app sets none). Errors name the app.
//
// It is the one place for these steps: newDispatcher uses it for the
// first generation, loadSpec for every reload.
func prepareCommand(app *appfile.App, inherited []string) (env []string, path string, err error) {
	if inherited == nil {
		inherited = os.Environ()
	}
	if env, err = baseEnv(inherited, app); err != nil {
		return nil, "", fmt.Errorf("app %s: %w", app.Name, err)
	}
	if err := checkSpawnable(app, env); err != nil {
		return nil, "", fmt.Errorf("app %s: %w", app.Name, err)
	}
	cwd := app.WorkingDirectory
	if cwd == "" {
		if cwd, err = os.Getwd(); err != nil {
			return nil, "", fmt.Errorf("app %s: %w", app.Name, err)
		}
	}
	if path, err = lookPath(app.Command[0], envValue(env, "PATH"), cwd); err != nil {
		return nil, "", fmt.Errorf("app %s: command: %w", app.Name, err)
	}
	return env, path, nil
}

// ResolveCommand finds app's program the way the dispatcher will when it
// starts with the environment inherited: PATH from the app's environment
// and environment files, else from inherited; a name with a slash as it
// is. A service runs in "/" unless working_directory says otherwise. It
// returns the path, or an error naming what is missing: an environment
// file that cannot be read, or a program that is not there or not
// executable (wrapping fs.ErrNotExist or fs.ErrPermission when it is one
// of those).
func ResolveCommand(app *appfile.App, inherited []string) (string, error) {
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
