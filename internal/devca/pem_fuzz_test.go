package devca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// FuzzParsePEM feeds arbitrary bytes to the PEM readers of a CA directory
// (ca.pem and ca.key, read from disk by Load). They must never panic; a key
// they accept is an ECDSA P-256 key that survives a round trip through
// marshalKeyPEM; a certificate they accept came from exactly one
// CERTIFICATE block.
func FuzzParsePEM(f *testing.F) {
	ca, err := New(spiffeid.RequireTrustDomainFromString("cairn.test"), time.Now())
	if err != nil {
		f.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	keyPEM, err := marshalKeyPEM(key)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(ca.BundlePEM())
	f.Add(keyPEM)
	f.Add(append(ca.BundlePEM(), keyPEM...))
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Add([]byte("-----BEGIN PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\nAAAA\n-----END PRIVATE KEY-----\n"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		if cert, err := parseCertPEM(data); err == nil {
			if cert == nil {
				t.Fatalf("parseCertPEM(%q) = nil, nil", data)
			}
			if _, err := singlePEM(data, pemCertificate); err != nil {
				t.Fatalf("parseCertPEM(%q) accepted what singlePEM refuses: %v", data, err)
			}
		}
		k, err := parseKeyPEM(data)
		if err != nil {
			return
		}
		if k == nil || k.Curve != elliptic.P256() {
			t.Fatalf("parseKeyPEM(%q) = %v, want a P-256 key", data, k)
		}
		again, err := marshalKeyPEM(k)
		if err != nil {
			t.Fatalf("marshalKeyPEM(parseKeyPEM(%q)) error = %v", data, err)
		}
		k2, err := parseKeyPEM(again)
		if err != nil || !k2.Equal(k) {
			t.Fatalf("parseKeyPEM(marshalKeyPEM(k)) = %v, %v, want the same key", k2, err)
		}
	})
}
