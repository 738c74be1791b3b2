package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestMakeUpSaysItBuildsFirst runs the Makefile's up target with a stand-in
// go (it "builds" a stand-in cairn that prints its arguments): the first
// run says it is building, and that the first build takes a while, before
// the build starts; then cairn up runs with the state dir. A second run
// (the binaries built) says it builds, without the first-run note.
func TestMakeUpSaysItBuildsFirst(t *testing.T) {
	makeBin, err := exec.LookPath("make")
	if err != nil {
		t.Fatal("make is not installed")
	}
	dir := t.TempDir()
	bin, state := filepath.Join(dir, "bin"), filepath.Join(dir, "state")
	fakeGo := filepath.Join(dir, "go")
	script := `#!/bin/sh
echo "go $*"
mkdir -p ` + bin + `
printf '#!/bin/sh\necho "cairn $*"\n' > ` + bin + `/cairn
chmod +x ` + bin + `/cairn
`
	if err := os.WriteFile(fakeGo, []byte(script), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		run  string
		want []string // in this order
	}{
		{"first", []string{
			"building the binaries into " + bin + "/ (first run: about a minute) ...",
			"go build -o " + bin + "/ ./cmd/...",
			"cairn up --state-dir " + state + "/up",
		}},
		{"second", []string{
			"building the binaries into " + bin + "/ ...",
			"go build -o " + bin + "/ ./cmd/...",
			"cairn up --state-dir " + state + "/up",
		}},
	} {
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		cmd := exec.CommandContext(ctx, makeBin, "-s", "-C", filepath.Join("..", ".."), "up", "GO="+fakeGo, "BIN="+bin, "STATE="+state, "UPFLAGS=")
		out, err := cmd.CombinedOutput()
		cancel()
		if err != nil {
			t.Fatalf("%s make up: %v\n%s", tt.run, err, out)
		}
		if got := strings.Split(strings.TrimSpace(string(out)), "\n"); strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
			t.Errorf("%s make up printed\n%s\nwant\n%s", tt.run, out, strings.Join(tt.want, "\n"))
		}
	}
}
