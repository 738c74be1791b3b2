package devca_test

import (
	"crypto/x509"
	"encoding/pem"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func mustTD(t testing.TB, name string) spiffeid.TrustDomain {
	t.Helper()
	td, err := spiffeid.TrustDomainFromString(name)
	if err != nil {
		t.Fatalf("TrustDomainFromString(%q) error = %v", name, err)
	}
	return td
}

func mustID(t testing.TB, td spiffeid.TrustDomain, segments ...string) spiffeid.ID {
	t.Helper()
	id, err := spiffeid.FromSegments(td, segments...)
	if err != nil {
		t.Fatalf("FromSegments(%s, %q) error = %v", td, segments, err)
	}
	return id
}

func newCA(t testing.TB, td spiffeid.TrustDomain) *devca.CA {
	t.Helper()
	ca, err := devca.New(td, time.Now())
	if err != nil {
		t.Fatalf("New(%s) error = %v", td, err)
	}
	return ca
}

func issue(t testing.TB, ca *devca.CA, id spiffeid.ID, opts devca.LeafOptions) *devca.Leaf {
	t.Helper()
	leaf, err := ca.Issue(id, opts)
	if err != nil {
		t.Fatalf("Issue(%s, %+v) error = %v", id, opts, err)
	}
	return leaf
}

func bundleOf(ca *devca.CA) *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.TrustDomain(), []*x509.Certificate{ca.Certificate()})
}

// verifyPEM verifies a PEM certificate as an X.509-SVID against bundle at
// the current time.
func verifyPEM(t testing.TB, certPEM []byte, bundle *x509bundle.Bundle) (spiffeid.ID, error) {
	t.Helper()
	block, _ := pem.Decode(certPEM)
	if block == nil {
		t.Fatalf("pem.Decode(%q) = nil", certPEM)
	}
	id, _, err := x509svid.ParseAndVerify([][]byte{block.Bytes}, bundle)
	return id, err
}

// snapshot returns the content of every regular file under dir by path.
func snapshot(t testing.TB, dir string) map[string]string {
	t.Helper()
	files := map[string]string{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		files[path] = string(b)
		return err
	})
	if err != nil {
		t.Fatalf("WalkDir(%s) error = %v", dir, err)
	}
	return files
}

func mode(t testing.TB, path string) fs.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatalf("Stat(%s) error = %v", path, err)
	}
	return fi.Mode().Perm()
}

// cmpOpts lets cmp compare go-spiffe's value types, which have unexported
// fields and are comparable with ==.
var cmpOpts = cmpopts.EquateComparable(spiffeid.TrustDomain{}, spiffeid.ID{})
