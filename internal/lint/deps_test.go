package lint

import (
	"os/exec"
	"strings"
	"testing"
)

// consensusDeps are the packages of the root KMS replica: Raft, its bolt
// store and the replica's own code. Only the root KMS links them.
var consensusDeps = []string{
	"github.com/hashicorp/raft",
	"github.com/hashicorp/raft-boltdb/v2",
	"go.etcd.io/bbolt",
	"github.com/cairnkms/cairn/rootkms",
	"github.com/cairnkms/cairn/rootkms/fsm",
	"github.com/cairnkms/cairn/rootkms/raftnode",
}

// deps lists the packages pkgs link (go list -deps).
func deps(t *testing.T, pkgs ...string) map[string]bool {
	t.Helper()
	cmd := exec.Command("go", append([]string{"list", "-deps"}, pkgs...)...)
	cmd.Dir = moduleRoot(t)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps %v: %v", pkgs, err)
	}
	set := map[string]bool{}
	for _, p := range strings.Fields(string(out)) {
		set[p] = true
	}
	return set
}

// TestServingPathLinksNoConsensus: the regional KMS, regionctl, the Tink
// client, the tools built on it, the distributors and the safe tool never
// link the Raft replica (a smaller
// binary, and less code where customers' keysets live); they reach the root
// KMS through rootkmsclient. The root KMS binary itself does link it, which
// shows the check can see it.
func TestServingPathLinksNoConsensus(t *testing.T) {
	for _, pkg := range []string{"./cmd/kms", "./cmd/regionctl", "./kmsclient", "./cmd/cairn", "./examples/blobstore", "./cmd/distributor", "./cmd/safe"} {
		got := deps(t, pkg)
		for _, banned := range consensusDeps {
			if got[banned] {
				t.Errorf("%s links %s; reach the root KMS through rootkms/rootkmsclient", pkg, banned)
			}
		}
	}
	if !deps(t, "./cmd/rootkms")["github.com/hashicorp/raft"] {
		t.Error("go list -deps ./cmd/rootkms has no github.com/hashicorp/raft; the check above cannot see what it looks for")
	}
}

// TestNoTierLinksTheOperatorsTool: the serving tiers (regional KMS, root
// KMS, distributors, safes) and the client never link regionctl, the
// operator's tool; what both sides read (the bundle format, the Safety
// Condition) lives in internal/. regionctl's own binary does link it, which
// shows the check can see it.
func TestNoTierLinksTheOperatorsTool(t *testing.T) {
	const tool = "github.com/cairnkms/cairn/regionctl/"
	for _, pkg := range []string{"./cmd/kms", "./cmd/rootkms", "./cmd/distributor", "./cmd/safe", "./kmsclient"} {
		for p := range deps(t, pkg) {
			if strings.HasPrefix(p, tool) {
				t.Errorf("%s links %s; share the format through internal/ instead", pkg, p)
			}
		}
	}
	linked := false
	for p := range deps(t, "./cmd/regionctl") {
		linked = linked || strings.HasPrefix(p, tool)
	}
	if !linked {
		t.Error("go list -deps ./cmd/regionctl has no regionctl package; the check above cannot see what it looks for")
	}
}

// TestInternalImportsNoTier: internal/ is the lower floor (identity, audit,
// the bundle format, the Safety Condition ...). Nothing there links a tier
// (rootkms, kms, distributor, safe, regionctl), the client, or a binary's
// code under cmd/; an application built on the tiers (the `cairn up`
// launcher) lives with its binary. The generated persisted formats under
// proto/ are shared by both sides and allowed.
func TestInternalImportsNoTier(t *testing.T) {
	const mod = "github.com/cairnkms/cairn/"
	tiers := []string{"rootkms", "kms", "distributor", "safe", "regionctl", "kmsclient", "cmd", "tests", "examples"}
	cmd := exec.Command("go", "list", "./internal/...")
	cmd.Dir = moduleRoot(t)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list ./internal/...: %v", err)
	}
	pkgs := strings.Fields(string(out))
	if len(pkgs) < 5 {
		t.Fatalf("go list ./internal/... = %v; the check cannot see the packages it looks at", pkgs)
	}
	for _, pkg := range pkgs {
		for p := range deps(t, pkg) {
			rest, ok := strings.CutPrefix(p, mod)
			if !ok {
				continue
			}
			for _, tier := range tiers {
				if rest == tier || strings.HasPrefix(rest, tier+"/") {
					t.Errorf("%s links %s; internal/ holds foundations that import no tier", pkg, p)
				}
			}
		}
	}
}
