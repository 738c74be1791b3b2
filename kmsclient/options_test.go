package kmsclient_test

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/kmsclient"
)

// TestNewErrors: options that cannot work are refused by New with an error
// that says why.
func TestNewErrors(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	src := kmsclient.WithSource(pki.Source(appID))
	ep := kmsclient.WithEndpoints(east, "127.0.0.1:7001")
	_, certFile, keyFile := pki.Issue(appID, devca.LeafOptions{})
	loose := t.TempDir() + "/loose-key.pem"
	data, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(loose, data, 0o644); err != nil {
		t.Fatal(err)
	}
	cert := pki.TLSCertificate(appID, devca.LeafOptions{})

	tests := []struct {
		name string
		opts []kmsclient.Option
		want string
	}{
		{"nothing", nil, "kmsclient: no endpoints"},
		{"no endpoints", []kmsclient.Option{src}, "kmsclient: no endpoints"},
		{"no identity", []kmsclient.Option{ep}, "kmsclient: no identity"},
		{"two identities", []kmsclient.Option{ep, src, kmsclient.WithIdentityFiles(certFile, keyFile, pki.BundleFile())}, "more than one identity option"},
		{"bad region", []kmsclient.Option{src, kmsclient.WithEndpoints("US-East", "127.0.0.1:1")}, `region "US-East" must match`},
		{"region without addresses", []kmsclient.Option{src, kmsclient.WithEndpoints(east)}, `WithEndpoints("us-east"): no addresses`},
		{"address without port", []kmsclient.Option{src, kmsclient.WithEndpoints(east, "kms.example")}, `address "kms.example" is not host:port`},
		{"address twice", []kmsclient.Option{src, ep, kmsclient.WithEndpoints(west, "127.0.0.1:7001")}, "endpoint 127.0.0.1:7001 is given for region us-east and again for region us-west"},
		{"negative timeout", []kmsclient.Option{src, ep, kmsclient.WithTimeout(-time.Second)}, "WithTimeout(-1s): negative"},
		{"negative attempt timeout", []kmsclient.Option{src, ep, kmsclient.WithAttemptTimeout(-time.Second)}, "WithAttemptTimeout(-1s): negative"},
		{"negative attempts", []kmsclient.Option{src, ep, kmsclient.WithRetry(kmsclient.RetryPolicy{MaxAttempts: -1})}, "negative field"},
		{"negative backoff", []kmsclient.Option{src, ep, kmsclient.WithRetry(kmsclient.RetryPolicy{InitialBackoff: -1})}, "negative field"},
		{"backoffs swapped", []kmsclient.Option{src, ep, kmsclient.WithRetry(kmsclient.RetryPolicy{InitialBackoff: 2 * time.Second, MaxBackoff: time.Second})}, "InitialBackoff 2s is more than MaxBackoff 1s"},
		{"fallback without fallbacks", []kmsclient.Option{src, ep, kmsclient.WithDecryptFallback(east)}, "no fallback regions"},
		{"fallback region without endpoints", []kmsclient.Option{src, ep, kmsclient.WithDecryptFallback(east, west)}, "fallback region us-west has no endpoints"},
		{"fallback of a region without endpoints", []kmsclient.Option{src, ep, kmsclient.WithDecryptFallback(west, east)}, "region us-west has no endpoints"},
		{"fallback to itself", []kmsclient.Option{src, ep, kmsclient.WithDecryptFallback(east, east)}, "cannot be its own fallback"},
		{"fallback twice", []kmsclient.Option{src, ep, kmsclient.WithEndpoints(west, "127.0.0.1:7002"), kmsclient.WithDecryptFallback(east, west, west)}, "fallback region us-west given twice"},
		{"bad fallback region", []kmsclient.Option{src, ep, kmsclient.WithDecryptFallback(east, "West!")}, `region "West!" must match`},
		{"nil source", []kmsclient.Option{ep, kmsclient.WithSource(nil)}, "WithSource(nil)"},
		{"nil option", []kmsclient.Option{src, ep, nil}, "nil Option"},
		{"identity files unnamed", []kmsclient.Option{ep, kmsclient.WithIdentityFiles("", keyFile, pki.BundleFile())}, "every file must be named"},
		{"identity files missing", []kmsclient.Option{ep, kmsclient.WithIdentityFiles(t.TempDir()+"/none.pem", keyFile, pki.BundleFile())}, "no such file"},
		{"identity key readable by others", []kmsclient.Option{ep, kmsclient.WithIdentityFiles(certFile, loose, pki.BundleFile())}, "must not be readable by group or others"},
		{"identity bundle is not a CA", []kmsclient.Option{ep, kmsclient.WithIdentityFiles(certFile, keyFile, keyFile)}, "trust bundle"},
		{"cert file not PEM", []kmsclient.Option{ep, kmsclient.WithIdentityFiles(pki.Dir, keyFile, pki.BundleFile())}, "identity certificate"},
		{"nil TLS config", []kmsclient.Option{ep, kmsclient.WithTLSConfig(nil)}, "WithTLSConfig(nil)"},
		{"nil dialer", []kmsclient.Option{src, ep, kmsclient.WithContextDialer(nil)}, "WithContextDialer(nil)"},
		{"TLS config without certificate", []kmsclient.Option{ep, kmsclient.WithTLSConfig(&tls.Config{})}, "presents no client certificate"},
		{"TLS config verifying nothing", []kmsclient.Option{ep, kmsclient.WithTLSConfig(&tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true})}, "does not authenticate the server"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := kmsclient.New(tc.opts...)
			if err == nil {
				c.Close()
				t.Fatalf("New = nil error, want one containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New = %v, want an error containing %q", err, tc.want)
			}
			for _, line := range strings.Split(err.Error(), "\n") {
				if !strings.HasPrefix(line, "kmsclient: ") {
					t.Errorf("error line %q lacks the kmsclient: prefix", line)
				}
			}
		})
	}
}

// TestNewValid: well-formed options make a client that dials nothing yet.
func TestNewValid(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	_, certFile, keyFile := pki.Issue(appID, devca.LeafOptions{})
	cert := pki.TLSCertificate(appID, devca.LeafOptions{})
	for name, id := range map[string]kmsclient.Option{
		"files":  kmsclient.WithIdentityFiles(certFile, keyFile, pki.BundleFile()),
		"source": kmsclient.WithSource(pki.Source(appID)),
		"tls":    kmsclient.WithTLSConfig(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: caPool(pki)}),
	} {
		t.Run(name, func(t *testing.T) {
			c, err := kmsclient.New(id, kmsclient.WithEndpoints(east, "127.0.0.1:7001", "[::1]:7001", "kms-1.us-east.example:443"),
				kmsclient.WithEndpoints(west, "127.0.0.1:7002"), kmsclient.WithDecryptFallback(east, west),
				kmsclient.WithTimeout(time.Second), kmsclient.WithAttemptTimeout(time.Second), kmsclient.WithRetry(kmsclient.RetryPolicy{MaxAttempts: 1}), kmsclient.WithLogger(nil))
			if err != nil {
				t.Fatalf("New = %v", err)
			}
			if err := c.Close(); err != nil {
				t.Errorf("Close = %v", err)
			}
		})
	}
}

// TestGetAEAD: GetAEAD and AEAD accept well-formed URIs and names of
// configured regions only; Supported says the same without an error.
func TestGetAEAD(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	c := fakeClient(t, pki, kmsclient.WithEndpoints(east, "127.0.0.1:7001"))
	tests := []struct {
		uri  string
		want string // error substring; "" for success
	}{
		{"cairn-kms://us-east/payments/ledger", ""},
		{"cairn-kms://us-east/ledger", ""},
		{"cairn-kms://us-east/a/b/c/d.e_f-g", ""},
		{"cairn-kms://us-west/payments/ledger", `no endpoints for region "us-west"`},
		{"cairn-kms://us-east/", "keyset name"},
		{"cairn-kms://us-east", "no keyset"},
		{"cairn-kms://us-east/Payments", "keyset name"},
		{"cairn-kms://us-east/payments//ledger", "keyset name"},
		{"cairn-kms://us-east/payments/ledger/", "keyset name"},
		{"cairn-kms:///payments/ledger", "region"},
		{"cairn-kms://1east/payments", "region"},
		{"CAIRN-KMS://us-east/payments/ledger", "invalid key URI"},
		{"gcp-kms://projects/p/locations/l/keyRings/r/cryptoKeys/k", "invalid key URI"},
		{"", "invalid key URI"},
	}
	for _, tc := range tests {
		a, err := c.GetAEAD(tc.uri)
		if tc.want == "" {
			if err != nil || a == nil {
				t.Errorf("GetAEAD(%q) = %v, %v, want an AEAD", tc.uri, a, err)
			} else if _, ok := a.(*kmsclient.AEAD); !ok {
				t.Errorf("GetAEAD(%q) = %T, want *kmsclient.AEAD", tc.uri, a)
			}
		} else if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "kmsclient: ") {
			t.Errorf("GetAEAD(%q) = %v, want an error containing %q", tc.uri, err, tc.want)
		}
		if got, want := c.Supported(tc.uri), tc.want == ""; got != want {
			t.Errorf("Supported(%q) = %v, want %v", tc.uri, got, want)
		}
	}
	if _, err := c.AEAD(east, "Bad Name"); err == nil {
		t.Error(`AEAD(us-east, "Bad Name") = nil error`)
	}
	if _, err := c.AEAD("Nowhere", ledger); err == nil {
		t.Error(`AEAD("Nowhere", ledger) = nil error`)
	}
	a, err := c.AEAD(east, ledger)
	if err != nil || a.Region() != east || a.Keyset() != ledger {
		t.Errorf("AEAD(us-east, ledger) = %v, %v", a, err)
	}
}

// TestParseKeyURI: parsing splits at the first '/', and KeyURI inverts it.
func TestParseKeyURI(t *testing.T) {
	for _, tc := range []struct{ uri, region, keyset string }{
		{"cairn-kms://us-east/payments/ledger", "us-east", "payments/ledger"},
		{"cairn-kms://eu-west-2/x", "eu-west-2", "x"},
		{"cairn-kms://ap/a.b/c_d/e-f", "ap", "a.b/c_d/e-f"},
	} {
		r, k, err := kmsclient.ParseKeyURI(tc.uri)
		if err != nil || r != tc.region || k != tc.keyset {
			t.Errorf("ParseKeyURI(%q) = %q, %q, %v, want %q, %q", tc.uri, r, k, err, tc.region, tc.keyset)
		}
		if got := kmsclient.KeyURI(r, k); got != tc.uri {
			t.Errorf("KeyURI(%q, %q) = %q, want %q", r, k, got, tc.uri)
		}
	}
	_, _, err := kmsclient.ParseKeyURI("cairn-kms://us-east")
	if !errors.Is(err, kmsclient.ErrInvalidURI) {
		t.Errorf("ParseKeyURI error %v does not wrap ErrInvalidURI", err)
	}
	long := "cairn-kms://us-east/" + strings.Repeat("a", 5000)
	if _, _, err := kmsclient.ParseKeyURI(long); err == nil || len(err.Error()) > 600 {
		t.Errorf("ParseKeyURI(5000-byte keyset) = %d-byte error %v, want a short error", len(err.Error()), err)
	}
}

// FuzzParseKeyURI: whatever parses round-trips through KeyURI.
func FuzzParseKeyURI(f *testing.F) {
	for _, s := range []string{"cairn-kms://us-east/payments/ledger", "cairn-kms://a/b", "cairn-kms://x//y", "cairn-kms:///"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, uri string) {
		r, k, err := kmsclient.ParseKeyURI(uri)
		if err != nil {
			return
		}
		if got := kmsclient.KeyURI(r, k); got != uri {
			t.Errorf("KeyURI(ParseKeyURI(%q)) = %q", uri, got)
		}
		if r2, k2, err := kmsclient.ParseKeyURI(kmsclient.KeyURI(r, k)); err != nil || r2 != r || k2 != k {
			t.Errorf("ParseKeyURI(KeyURI(%q, %q)) = %q, %q, %v", r, k, r2, k2, err)
		}
	})
}

// caPool returns the PKI's CA as a certificate pool.
func caPool(pki *identitytest.PKI) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(pki.CA.Certificate())
	return p
}
