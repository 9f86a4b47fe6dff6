package dispatcher

import (
	"time"

	"github.com/cohort-dev/cohort/generator/config"
)

// setBenchLimit gives BenchmarkRelay's output its budget (a file of its
// own, so that the benchmark runs unchanged on code without a limiter).
func setBenchLimit(o *output, burst int) {
	o.limit = newLimiter(config.LogRateLimit{Interval: time.Hour, Burst: burst}, o.warnf)
}
