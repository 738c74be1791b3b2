package cli_test

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/tink"
	"go.uber.org/goleak"
	"google.golang.org/grpc"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/regionctl/cli"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const regionctlID = "spiffe://cairn.test/regionctl/global/regionctl"

// result is one regionctl run.
type result struct {
	code           int
	stdout, stderr string
}

func run(t *testing.T, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	code := cli.Run(ctx, args, &out, &errb)
	return result{code: code, stdout: out.String(), stderr: errb.String()}
}

// mustRun runs regionctl and fails the test unless it exits 0.
func mustRun(t *testing.T, args ...string) result {
	t.Helper()
	r := run(t, args...)
	if r.code != 0 {
		t.Fatalf("regionctl %s = %d, want 0\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}

// identityFlags issues a leaf for id and returns the flags naming it.
func identityFlags(pki *identitytest.PKI, id string) []string {
	_, cert, key := pki.Issue(id, devca.LeafOptions{})
	return []string{"--trust-domain", pki.CA.TrustDomain().Name(), "--cert", cert, "--key", key, "--ca", pki.BundleFile()}
}

// serve starts srv on a loopback port; the test's cleanup stops it and waits
// for Serve to return.
func serve(t *testing.T, srv *grpc.Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	return lis.Addr().String()
}

// newServer returns a gRPC server with identity id's mTLS credentials that
// puts the caller's verified identity in the request context.
func newServer(pki *identitytest.PKI, id string) *grpc.Server {
	return grpc.NewServer(grpc.Creds(pki.ServerCredentials(id)), grpc.UnaryInterceptor(identity.UnaryServerInterceptor()))
}

// regionKeys are test region master keys: region -> version -> AEAD.
type regionKeys struct {
	mu   sync.Mutex
	keys map[string]map[uint32]tink.AEAD
}

func (r *regionKeys) add(t *testing.T, region string, version uint32) tink.AEAD {
	t.Helper()
	a, err := r.create(region, version)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// create makes a fresh region key version (safe to call from any goroutine).
func (r *regionKeys) create(region string, version uint32) (tink.AEAD, error) {
	rk, err := keysets.NewRegionKey()
	if err != nil {
		return nil, err
	}
	defer rk.Wipe()
	a, err := keysets.RegionAEAD(rk)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.keys == nil {
		r.keys = map[string]map[uint32]tink.AEAD{}
	}
	if r.keys[region] == nil {
		r.keys[region] = map[uint32]tink.AEAD{}
	}
	r.keys[region][version] = a
	return a, nil
}

func (r *regionKeys) get(region string, version uint32) (tink.AEAD, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.keys[region][version]
	return a, ok
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func contains(t *testing.T, what, got string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(got, w) {
			t.Errorf("%s = %q, want it to contain %q", what, got, w)
		}
	}
}
