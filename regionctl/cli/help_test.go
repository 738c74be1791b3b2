package cli

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// TestHelp checks that regionctl -h and every command's -h print help
// starting with one line that says what it is, and exit 0.
func TestHelp(t *testing.T) {
	type tc struct {
		args      []string
		firstLine string
	}
	tests := []tc{
		{[]string{"-h"}, Summary},
		{[]string{"--help"}, Summary},
		{[]string{"help"}, Summary},
		{[]string{"keyset", "-h"}, Summary},
	}
	for cmd, verbs := range commands {
		for verb := range verbs {
			name := cmd + " " + verb
			tests = append(tests, tc{[]string{cmd, verb, "-h"}, "regionctl " + name + ": " + summaries[name]})
		}
	}
	for name := range single {
		tests = append(tests, tc{[]string{name, "--help"}, "regionctl " + name + ": " + summaries[name]})
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := Run(context.Background(), tt.args, &stdout, &stderr)
			out := stdout.String() + stderr.String()
			first, _, _ := strings.Cut(out, "\n")
			if code != 0 || first != tt.firstLine || !strings.Contains(out, "-") {
				t.Errorf("regionctl %v = %d, output %q; want 0 and a first line %q", tt.args, code, out, tt.firstLine)
			}
		})
	}
	for cmd, verbs := range commands {
		for verb := range verbs {
			if summaries[cmd+" "+verb] == "" {
				t.Errorf("summaries has no line for %q", cmd+" "+verb)
			}
		}
	}
	for name := range single {
		if summaries[name] == "" {
			t.Errorf("summaries has no line for %q", name)
		}
	}
}
