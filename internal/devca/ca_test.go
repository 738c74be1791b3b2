package devca_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestNew(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	ca, err := devca.New(td, now)
	if err != nil {
		t.Fatalf("New(%s) error = %v", td, err)
	}
	cert := ca.Certificate()
	pub, _ := cert.PublicKey.(*ecdsa.PublicKey)
	maxSerial := new(big.Int).Lsh(big.NewInt(1), 128)

	tests := []struct {
		name      string
		got, want any
	}{
		{"TrustDomain", ca.TrustDomain(), td},
		{"Subject.CommonName", cert.Subject.CommonName, "Cairn dev CA (dev.cairn.test)"},
		{"IsCA", cert.IsCA, true},
		{"BasicConstraintsValid", cert.BasicConstraintsValid, true},
		{"MaxPathLen", cert.MaxPathLen, 0},
		{"MaxPathLenZero", cert.MaxPathLenZero, true},
		{"KeyUsage", cert.KeyUsage, x509.KeyUsageCertSign | x509.KeyUsageCRLSign},
		{"len(URIs)", len(cert.URIs), 1},
		{"URIs[0]", cert.URIs[0].String(), "spiffe://dev.cairn.test"},
		{"NotBefore", cert.NotBefore, now.Add(-time.Minute)},
		{"NotAfter", cert.NotAfter, now.Add(10 * 365 * 24 * time.Hour)},
		{"PublicKeyAlgorithm", cert.PublicKeyAlgorithm, x509.ECDSA},
		{"curve is P-256", pub != nil && pub.Curve == elliptic.P256(), true},
		{"serial in (0, 2^128)", cert.SerialNumber.Sign() > 0 && cert.SerialNumber.Cmp(maxSerial) < 0, true},
		{"self-signed", cert.CheckSignatureFrom(cert) == nil, true},
		{"BundlePEM parses to Certificate", bundlePEMMatches(ca), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, tt.got, cmpOpts); diff != "" {
				t.Errorf("New(%s).%s mismatch (-want +got):\n%s", td, tt.name, diff)
			}
		})
	}
}

func bundlePEMMatches(ca *devca.CA) bool {
	certs, err := parseBundle(ca.BundlePEM())
	return err == nil && len(certs) == 1 && certs[0].Equal(ca.Certificate())
}

func parseBundle(b []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		block, rest := pem.Decode(b)
		if block == nil {
			return certs, nil
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
		b = rest
	}
}

func TestNewRandomSerials(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	a, b := newCA(t, td), newCA(t, td)
	if a.Certificate().SerialNumber.Cmp(b.Certificate().SerialNumber) == 0 {
		t.Errorf("New(%s) twice gave serial %x both times, want different serials", td, a.Certificate().SerialNumber)
	}
}

func TestNewRefusesZeroTrustDomain(t *testing.T) {
	if ca, err := devca.New(spiffeid.TrustDomain{}, time.Now()); err == nil {
		t.Errorf("New(zero trust domain) = %v, want error", ca)
	}
}

func TestSaveLoad(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	ca := newCA(t, td)
	dir := filepath.Join(t.TempDir(), "ca")
	if err := ca.Save(dir); err != nil {
		t.Fatalf("Save(%s) error = %v", dir, err)
	}
	loaded, err := devca.Load(dir)
	if err != nil {
		t.Fatalf("Load(%s) error = %v", dir, err)
	}
	// A leaf of the loaded CA must verify against the original's bundle: the
	// key round-tripped, not just the certificate.
	leaf := issue(t, loaded, mustID(t, td, "kms", "us-east", "kms-1"), devca.LeafOptions{})
	_, verifyErr := verifyPEM(t, leaf.CertPEM, bundleOf(ca))
	caPEM, _ := os.ReadFile(filepath.Join(dir, "ca.pem"))
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}

	tests := []struct {
		name      string
		got, want any
	}{
		{"dir mode", mode(t, dir), fs.FileMode(0o700)},
		{"ca.pem mode", mode(t, filepath.Join(dir, "ca.pem")), fs.FileMode(0o644)},
		{"ca-key.pem mode", mode(t, filepath.Join(dir, "ca-key.pem")), fs.FileMode(0o600)},
		{"files (no temporaries left)", names, []string{"ca-key.pem", "ca.pem"}},
		{"ca.pem content", string(caPEM), string(ca.BundlePEM())},
		{"Load TrustDomain", loaded.TrustDomain(), td},
		{"Load Certificate", loaded.Certificate().Equal(ca.Certificate()), true},
		{"Load BundlePEM", string(loaded.BundlePEM()), string(ca.BundlePEM())},
		{"leaf of loaded CA verifies", verifyErr == nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, tt.got, cmpOpts); diff != "" {
				t.Errorf("Save then Load(%s): %s mismatch (-want +got):\n%s", dir, tt.name, diff)
			}
		})
	}
}

func TestLoadRefuses(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	ca := newCA(t, td)
	other := newCA(t, td)
	otherDir := t.TempDir()
	if err := other.Save(otherDir); err != nil {
		t.Fatalf("Save(%s) error = %v", otherDir, err)
	}
	leaf := issue(t, ca, mustID(t, td, "kms", "us-east", "kms-1"), devca.LeafOptions{})
	otherKey, _ := os.ReadFile(filepath.Join(otherDir, "ca-key.pem"))

	tests := []struct {
		name    string
		damage  func(t *testing.T, dir string)
		wantIs  error // if set, the error must match it
		notFail bool
	}{
		{name: "intact", damage: func(*testing.T, string) {}, notFail: true},
		{name: "key mode 0644", damage: chmod("ca-key.pem", 0o644)},
		{name: "key mode 0640", damage: chmod("ca-key.pem", 0o640)},
		{name: "key mode 0604", damage: chmod("ca-key.pem", 0o604)},
		{name: "key mode 0400", damage: chmod("ca-key.pem", 0o400), notFail: true},
		{name: "ca.pem missing", damage: remove("ca.pem"), wantIs: fs.ErrNotExist},
		{name: "ca-key.pem missing", damage: remove("ca-key.pem"), wantIs: fs.ErrNotExist},
		{name: "ca.pem garbage", damage: write("ca.pem", "not a certificate", 0o644)},
		{name: "ca.pem is the key", damage: write("ca.pem", string(otherKey), 0o644)},
		{name: "ca.pem with two certificates", damage: write("ca.pem", string(ca.BundlePEM())+string(other.BundlePEM()), 0o644)},
		{name: "ca.pem is a leaf", damage: write("ca.pem", string(leaf.CertPEM), 0o644)},
		{name: "ca-key.pem garbage", damage: write("ca-key.pem", "not a key", 0o600)},
		{name: "ca-key.pem of another CA", damage: write("ca-key.pem", string(otherKey), 0o600)},
		{name: "ca-key.pem is a directory", damage: func(t *testing.T, dir string) {
			remove("ca-key.pem")(t, dir)
			if err := os.Mkdir(filepath.Join(dir, "ca-key.pem"), 0o700); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := ca.Save(dir); err != nil {
				t.Fatalf("Save(%s) error = %v", dir, err)
			}
			tt.damage(t, dir)
			got, err := devca.Load(dir)
			switch {
			case tt.notFail && err != nil:
				t.Errorf("Load(%s) error = %v, want nil", dir, err)
			case !tt.notFail && err == nil:
				t.Errorf("Load(%s) = %v, want error", dir, got)
			case tt.wantIs != nil && !errors.Is(err, tt.wantIs):
				t.Errorf("Load(%s) error = %v, want one matching %v", dir, err, tt.wantIs)
			}
		})
	}
}

func chmod(name string, perm fs.FileMode) func(*testing.T, string) {
	return func(t *testing.T, dir string) {
		t.Helper()
		if err := os.Chmod(filepath.Join(dir, name), perm); err != nil {
			t.Fatal(err)
		}
	}
}

func remove(name string) func(*testing.T, string) {
	return func(t *testing.T, dir string) {
		t.Helper()
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
}

func write(name, content string, perm fs.FileMode) func(*testing.T, string) {
	return func(t *testing.T, dir string) {
		t.Helper()
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), perm); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, perm); err != nil {
			t.Fatal(err)
		}
	}
}
