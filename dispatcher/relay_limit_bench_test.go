package dispatcher

import (
	"time"

	"github.com/cohort-dev/cohort/appfile"
)

// setBenchLimit gives BenchmarkRelay's output its budget (a file of its
// own, so that the benchmark runs unchanged on code without a limiter).
func setBenchLimit(o *output, burst int) {
	o.limit = newLimiter(appfile.LogRateLimit{Interval: time.Hour, Burst: burst}, o.warnf)
}
