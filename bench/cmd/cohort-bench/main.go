// Command cohort-bench runs cohort's load benchmark (package
// bench) and writes the markdown table, SVG chart and JSON into
// -out. It prints each target with PASS or MISS; a MISS does not fail the
// command, only a harness error does.
//
//	go run ./bench/cmd/cohort-bench -cohort bin/cohort -out docs/bench
//	go run ./bench/cmd/cohort-bench -only node-alone,node-cluster-rr -duration 2s
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/bench"
)

func main() {
	var cfg bench.Config
	var only string
	flag.StringVar(&cfg.Root, "root", ".", "the repository root")
	flag.StringVar(&cfg.Out, "out", "", "write results.md, results.svg and results.json into `dir`")
	flag.StringVar(&cfg.Cohort, "cohort", "", "the cohort `binary` (default: built from ./cmd/cohort)")
	flag.IntVar(&cfg.Workers, "workers", 0, "workers per cluster (default: the number of CPUs)")
	flag.IntVar(&cfg.Conns, "conns", 64, "concurrent connections")
	flag.DurationVar(&cfg.Warmup, "warmup", time.Second, "warm-up before each measured window")
	flag.DurationVar(&cfg.Duration, "duration", 3*time.Second, "measured window per row and workload")
	flag.DurationVar(&cfg.Reload, "reload", 6*time.Second, "measured window of a reload row")
	flag.IntVar(&cfg.Repeat, "repeat", 3, "runs of every throughput row, in interleaved rounds (the median is reported)")
	flag.IntVar(&cfg.LoadProcs, "load-procs", 0, "GOMAXPROCS of the load generator (default: half the CPUs)")
	flag.DurationVar(&cfg.QuietWait, "quiet-wait", time.Minute, "before each row, wait up to this long for other processes to leave the CPUs (negative: never wait)")
	flag.IntVar(&cfg.BasePort, "port", 18300, "first port; each row uses the next one")
	flag.StringVar(&only, "only", "", "comma-separated setup `ids` to run (default: all; -list shows them)")
	list := flag.Bool("list", false, "list the setups and exit")
	cost := flag.Bool("cost", false, "run the cost benchmark instead (issue 19): the balancer's own CPU per connection, Node's SCHED_RR primary as the baseline")
	costTotal := flag.Int64("cost-total", 20000, "requests per phase of -cost")
	costRate := flag.Float64("cost-rate", 4000, "requests per second of -cost's paced phase")
	costConns := flag.Int("cost-conns", 8, "clients of -cost")
	render := flag.String("render", "", "do not measure: render `results.json` of an earlier run again into -out")
	flag.Parse()
	if *list {
		for _, s := range bench.Setups() {
			fmt.Printf("%-20s %s\n", s[0], s[1])
		}
		return
	}
	if *render != "" {
		rep, err := bench.ReadReport(*render)
		if err == nil && cfg.Out != "" {
			err = rep.Write(cfg.Out)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "cohort-bench:", err)
			os.Exit(1)
		}
		printReport(rep)
		return
	}
	if only != "" {
		cfg.Only = strings.Split(only, ",")
	}
	cfg.Log = os.Stderr
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *cost {
		rep, err := bench.Cost(ctx, bench.CostConfig{
			Root: cfg.Root, Cohort: cfg.Cohort, Workers: cfg.Workers, Conns: *costConns, Total: *costTotal, Rate: *costRate, Only: cfg.Only,
			Log: func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) },
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, "cohort-bench:", err)
			os.Exit(1)
		}
		fmt.Print(rep.Markdown())
		return
	}
	start := time.Now()
	rep, err := bench.Run(ctx, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "cohort-bench:", err)
		os.Exit(1)
	}
	printReport(rep)
	fmt.Fprintf(os.Stderr, "cohort-bench: done in %v", time.Since(start).Round(time.Second))
	if cfg.Out != "" {
		fmt.Fprintf(os.Stderr, "; results in %s", cfg.Out)
	}
	fmt.Fprintln(os.Stderr)
}

// printReport writes the report and then each target with PASS, MISS or n/a.
func printReport(rep *bench.Report) {
	fmt.Print(rep.Markdown())
	fmt.Println()
	for _, t := range rep.Targets {
		fmt.Printf("%-4s %-14s %s", t.Result(), t.RatioText, t.Name)
		if t.Why != "" {
			fmt.Printf("  — %s", t.Why)
		}
		fmt.Println()
	}
}
