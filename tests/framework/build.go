// Package framework runs Cairn's real binaries as separate processes for the
// end-to-end tests under tests/: it builds the binaries once, starts, kills
// and restarts them (by PID, with their output kept in files), names free
// loopback ports before anything listens, talks to distributors over mTLS as
// any identity of the dev CA, and scans what the processes left on disk for
// key material.
//
// Every helper takes the test's testing.TB, fails it on error (never skips
// it), and bounds every wait with a deadline. Processes started here are
// killed in t.Cleanup, even when the test fails.
package framework

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Binaries are the built commands.
type Binaries struct {
	// Dir holds the binaries; Remove deletes it.
	Dir string
	// Cairn, Safe, Distributor and RootKMS are absolute paths of
	// cmd/cairn, cmd/safe, cmd/distributor and cmd/rootkms (KMSBinary and
	// RegionctlBinary name cmd/kms and cmd/regionctl).
	Cairn, Safe, Distributor, RootKMS string
	// Blobstore is examples/blobstore: a storage system that envelope-
	// encrypts files through kmsclient.
	Blobstore string
	// Echo is tests/echoserver: the bare mTLS gRPC server the out-of-process
	// benchmarks measure Cairn against.
	Echo string
}

// buildTimeout bounds `go build` (a cold cache on 2 cores needs about a
// minute, with cgo for the PKCS#11 safe).
const buildTimeout = 5 * time.Minute

// Build compiles every command (cmd/cairn, cmd/safe, cmd/distributor,
// cmd/rootkms, cmd/kms, cmd/regionctl), examples/blobstore and
// tests/echoserver of the module
// that contains the working directory into a new temporary directory, the
// --bin-dir of `cairn up`. It is meant for TestMain; call Remove when the
// tests are done.
func Build() (*Binaries, error) {
	root, err := ModuleRoot()
	if err != nil {
		return nil, err
	}
	// `go test` puts its own GOROOT/bin first on PATH, so this is the same
	// toolchain that builds the test.
	gobin, err := exec.LookPath("go")
	if err != nil {
		return nil, fmt.Errorf("framework: no go command on PATH: %w", err)
	}
	dir, err := os.MkdirTemp("", "cairn-e2e-bin-")
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, gobin, "build", "-o", dir+string(filepath.Separator), "./cmd/cairn", "./cmd/safe", "./cmd/distributor", "./cmd/rootkms", "./cmd/kms", "./cmd/regionctl", "./examples/blobstore", "./tests/echoserver")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("framework: go build ./cmd/... ./examples/blobstore ./tests/echoserver: %v\n%s", err, out)
	}
	b := &Binaries{
		Dir:         dir,
		Cairn:       filepath.Join(dir, "cairn"),
		Safe:        filepath.Join(dir, "safe"),
		Distributor: filepath.Join(dir, "distributor"),
		RootKMS:     filepath.Join(dir, "rootkms"),
		Blobstore:   filepath.Join(dir, "blobstore"),
		Echo:        filepath.Join(dir, "echoserver"),
	}
	for _, p := range []string{b.Cairn, b.Safe, b.Distributor, b.RootKMS, b.KMSBinary(), b.RegionctlBinary(), b.Blobstore, b.Echo} {
		if _, err := os.Stat(p); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("framework: built binary missing: %w", err)
		}
	}
	return b, nil
}

// Remove deletes the binaries.
func (b *Binaries) Remove() error { return os.RemoveAll(b.Dir) }

// ModuleRoot returns the directory of the go.mod above the working
// directory.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("framework: no go.mod above the working directory")
		}
		dir = parent
	}
}

// tail returns the last n lines of a file, for failure messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
