package chain

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// tailLines is how much of a failed process's log a failure report shows.
const tailLines = 20

// step is one line of `cairn up`'s progress: a title, and the work, which
// returns a short detail for the "ok" line.
type step struct {
	title string
	do    func() (detail string, err error)
}

// runSteps runs steps in order, printing for each
//
//	[ 4/11] genesis: 2-of-3 into 3 file safes ... ok (0.8s): genesis 1f2e…
//
// and, for the first that fails, the error and the last lines of the log of
// every process the error names; it stops there and returns that error.
func runSteps(out io.Writer, steps []step) error {
	width := len(fmt.Sprint(len(steps)))
	for i, s := range steps {
		fmt.Fprintf(out, "[%*d/%d] %s ... ", width, i+1, len(steps), s.title)
		start := time.Now()
		detail, err := s.do()
		took := formatDuration(time.Since(start))
		if err != nil {
			fmt.Fprintf(out, "FAILED (%s)\n", took)
			writeFailure(out, err)
			return err
		}
		if detail != "" {
			fmt.Fprintf(out, "ok (%s): %s\n", took, detail)
		} else {
			fmt.Fprintf(out, "ok (%s)\n", took)
		}
	}
	return nil
}

// progressIndent starts the lines a watched step prints.
const progressIndent = "    "

// watched makes do the body of a step that prints progress lines while it
// runs. runSteps has printed the step's title ("[12/14] title ... ") when
// the body starts: the body ends that line, hands do a function that
// prints one indented line with the time since the step began, and, once
// do returns, indents the outcome runSteps prints next ("ok (6.3s): ...")
// to match:
//
//	[12/14] rollout: ... ...
//	    +0.0s  stage 1/3 canary: us-east [us-east/kms-1]
//	    +2.0s  stage 1/3 canary passed its gates
//	    ok (6.1s): ...
//
// progress must not be called after do returns.
func watched(out io.Writer, do func(progress func(line string)) (string, error)) func() (string, error) {
	return func() (string, error) {
		fmt.Fprintln(out)
		start := time.Now()
		detail, err := do(func(line string) {
			fmt.Fprintf(out, "%s%6s  %s\n", progressIndent, "+"+formatDuration(time.Since(start)), line)
		})
		fmt.Fprint(out, progressIndent)
		return detail, err
	}
}

// formatDuration prints d as seconds with one decimal: "0.8s", "12.3s".
func formatDuration(d time.Duration) string {
	return fmt.Sprintf("%.1fs", d.Seconds())
}

// writeFailure prints err, indented, and the end of every log it names.
func writeFailure(out io.Writer, err error) {
	fmt.Fprintf(out, "  error: %s\n", strings.ReplaceAll(err.Error(), "\n", "\n         "))
	seen := map[string]bool{}
	for _, le := range logErrors(err) {
		if seen[le.log] {
			continue
		}
		seen[le.log] = true
		fmt.Fprintf(out, "  last lines of %s's log (%s):\n", le.name, le.log)
		for _, line := range tail(le.log, tailLines) {
			fmt.Fprintf(out, "    | %s\n", line)
		}
	}
}

// logErrors returns every *logError in err's tree, depth first.
func logErrors(err error) []*logError {
	var out []*logError
	var walk func(error)
	walk = func(err error) {
		if err == nil {
			return
		}
		if le, ok := err.(*logError); ok {
			out = append(out, le)
		}
		switch u := err.(type) {
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				walk(e)
			}
		case interface{ Unwrap() error }:
			walk(u.Unwrap())
		}
	}
	walk(err)
	return out
}

// tail returns the last n lines of the file at path (or a line saying why
// it cannot).
func tail(path string, n int) []string {
	data, err := os.ReadFile(path)
	if err != nil {
		return []string{fmt.Sprintf("(cannot read the log: %v)", err)}
	}
	text := strings.TrimRight(string(data), "\n")
	if text == "" {
		return []string{"(empty)"}
	}
	lines := strings.Split(text, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines
}

// errInterrupted is returned by Up when its context ends before the chain is
// ready.
var errInterrupted = errors.New("chain: interrupted before the chain was ready")
