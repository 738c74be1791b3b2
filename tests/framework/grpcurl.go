package framework

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

var grpcurlOnce struct {
	sync.Once
	path string
	err  error
}

// Grpcurl builds grpcurl (pinned in tools/go.mod, the same one `make tools`
// puts in bin/tools) into the binaries' directory on first use, and returns
// its path. Tests run it as an operator would, against real servers.
func (b *Binaries) Grpcurl(t testing.TB) string {
	t.Helper()
	grpcurlOnce.Do(func() {
		root, err := ModuleRoot()
		if err != nil {
			grpcurlOnce.err = err
			return
		}
		gobin, err := exec.LookPath("go")
		if err != nil {
			grpcurlOnce.err = fmt.Errorf("framework: no go command on PATH: %w", err)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
		defer cancel()
		path := filepath.Join(b.Dir, "grpcurl")
		cmd := exec.CommandContext(ctx, gobin, "build", "-o", path, "github.com/fullstorydev/grpcurl/cmd/grpcurl")
		cmd.Dir = filepath.Join(root, "tools")
		if out, err := cmd.CombinedOutput(); err != nil {
			grpcurlOnce.err = fmt.Errorf("framework: building grpcurl from tools/go.mod: %v\n%s", err, out)
			return
		}
		grpcurlOnce.path = path
	})
	if grpcurlOnce.err != nil {
		t.Fatal(grpcurlOnce.err)
	}
	return grpcurlOnce.path
}
