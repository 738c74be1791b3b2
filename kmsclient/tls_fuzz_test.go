package kmsclient

import (
	"encoding/base64"
	"encoding/pem"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
)

// FuzzCertFileID feeds arbitrary PEM files to certFileID. What it accepts
// is the ID of the file's first CERTIFICATE block, which a file holding that
// block alone gives again; what it refuses is a kmsclient: error echoing no
// private key bytes.
func FuzzCertFileID(f *testing.F) {
	pki := identitytest.New(f, identitytest.TrustDomain)
	_, certFile, keyFile := pki.Issue("spiffe://cairn.test/client/us-east/app", devca.LeafOptions{})
	cert, err := os.ReadFile(certFile)
	if err != nil {
		f.Fatal(err)
	}
	key, err := os.ReadFile(keyFile)
	if err != nil {
		f.Fatal(err)
	}
	ca, err := os.ReadFile(pki.BundleFile())
	if err != nil {
		f.Fatal(err)
	}
	for _, b := range [][]byte{cert, key, ca, slices.Concat(key, cert), slices.Concat(cert, ca), slices.Concat(ca, cert), cert[:len(cert)/2],
		[]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), {}, []byte("not pem")} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "cert.pem")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		id, err := certFileID(path)
		var first *pem.Block
		for rest := data; ; {
			var b *pem.Block
			if b, rest = pem.Decode(rest); b == nil {
				break
			}
			if strings.Contains(b.Type, "PRIVATE KEY") && err != nil && len(b.Bytes) >= 8 {
				if msg := err.Error(); strings.Contains(msg, string(b.Bytes)) || strings.Contains(msg, base64.StdEncoding.EncodeToString(b.Bytes)[:8]) {
					t.Fatalf("certFileID error %q echoes private key bytes", msg)
				}
			}
			if b.Type == "CERTIFICATE" && first == nil {
				first = b
			}
		}
		if err != nil {
			if !strings.HasPrefix(err.Error(), "kmsclient: ") {
				t.Fatalf("certFileID(%q) error = %q, want the kmsclient: prefix", data, err)
			}
			return
		}
		if first == nil {
			t.Fatalf("certFileID(%q) = %v, nil for a file with no CERTIFICATE block", data, id)
		}
		if id.TrustDomain().IsZero() {
			t.Fatalf("certFileID(%q) = %v, an ID with no trust domain", data, id)
		}
		alone := filepath.Join(t.TempDir(), "cert.pem")
		if err := os.WriteFile(alone, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: first.Bytes}), 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := certFileID(alone)
		if err != nil || got != id {
			t.Fatalf("certFileID(first certificate alone) = %v, %v, want %v", got, err, id)
		}
	})
}
