// Package identitytest builds test PKIs at run time: a dev CA per test, and
// identity.Sources, TLS configs and gRPC credentials for any Cairn ID. No
// private key is ever committed; every key is made in the test's temp dir.
package identitytest

import (
	"crypto/tls"
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity"
)

// TrustDomain is the trust domain tests use unless they need another.
var TrustDomain = spiffeid.RequireTrustDomainFromString("cairn.test")

// PKI is a test CA and the directory its files are written to.
type PKI struct {
	t   testing.TB
	CA  *devca.CA
	Dir string
}

// New makes a fresh CA for td in a temp dir of t.
func New(t testing.TB, td spiffeid.TrustDomain) *PKI {
	t.Helper()
	ca, err := devca.New(td, time.Now())
	if err != nil {
		t.Fatalf("devca.New(%v) = %v", td, err)
	}
	dir := t.TempDir()
	if err := ca.Save(dir); err != nil {
		t.Fatalf("CA.Save = %v", err)
	}
	return &PKI{t: t, CA: ca, Dir: dir}
}

// BundleFile is the path of the PKI's trust bundle.
func (p *PKI) BundleFile() string { return p.Dir + "/ca.pem" }

// Bundle returns the PKI's trust bundle.
func (p *PKI) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(p.CA.TrustDomain(), []*x509.Certificate{p.CA.Certificate()})
}

// Issue issues a leaf for id (a full SPIFFE ID string) with opts and writes
// it under the PKI's dir, returning the cert and key paths.
func (p *PKI) Issue(id string, opts devca.LeafOptions) (leaf *devca.Leaf, certFile, keyFile string) {
	p.t.Helper()
	sid := spiffeid.RequireFromString(id)
	leaf, err := p.CA.Issue(sid, opts)
	if err != nil {
		p.t.Fatalf("Issue(%s) = %v", id, err)
	}
	certFile, keyFile = devca.LeafPaths(p.Dir, sid)
	if err := leaf.Save(certFile, keyFile); err != nil {
		p.t.Fatalf("Leaf.Save(%s) = %v", id, err)
	}
	return leaf, certFile, keyFile
}

// Source issues a fresh leaf for id and returns a Source over its files.
func (p *PKI) Source(id string) *identity.Source {
	p.t.Helper()
	_, certFile, keyFile := p.Issue(id, devca.LeafOptions{})
	src, err := identity.NewSource(identity.SourceConfig{
		CertFile:      certFile,
		KeyFile:       keyFile,
		BundleFile:    p.BundleFile(),
		TrustDomain:   p.CA.TrustDomain(),
		CheckInterval: -1,
	})
	if err != nil {
		p.t.Fatalf("NewSource(%s) = %v", id, err)
	}
	return src
}

// TLSCertificate issues a leaf for id with opts and returns it as a
// tls.Certificate, for clients that bypass Source (e.g. to present an expired
// certificate).
func (p *PKI) TLSCertificate(id string, opts devca.LeafOptions) tls.Certificate {
	p.t.Helper()
	leaf, err := p.CA.Issue(spiffeid.RequireFromString(id), opts)
	if err != nil {
		p.t.Fatalf("Issue(%s) = %v", id, err)
	}
	cert, err := leaf.TLSCertificate()
	if err != nil {
		p.t.Fatalf("TLSCertificate(%s) = %v", id, err)
	}
	return cert
}

// ClientCredentials returns gRPC credentials for a client with identity id
// that accepts any server of the PKI's trust domain.
func (p *PKI) ClientCredentials(id string) *identity.Credentials {
	p.t.Helper()
	return identity.ClientCredentials(p.Source(id), identity.MemberOf(p.CA.TrustDomain()))
}

// ServerCredentials returns gRPC credentials for a server with identity id
// that accepts any client of the PKI's trust domain.
func (p *PKI) ServerCredentials(id string) *identity.Credentials {
	p.t.Helper()
	return identity.ServerCredentials(p.Source(id), identity.MemberOf(p.CA.TrustDomain()))
}
