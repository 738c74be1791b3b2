// Package devca is the development certificate authority of Cairn.
//
// It mints a self-signed ECDSA P-256 CA for one SPIFFE trust domain and
// X.509-SVIDs (leaf certificates whose single URI SAN is a SPIFFE ID) for
// every component of a local chain: distributors, root KMS voters, regional
// KMS nodes, security officers, the regionctl tool and demo clients. Tests use
// it to build real PKI at run time; `cairn dev certs` uses [WriteChain] to
// write a chain to disk.
//
// The CA is for development and tests only: its private key lives in a file
// and nothing here is hardened against a hostile local user.
package devca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"github.com/cairnkms/cairn/internal/atomicfile"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

const (
	// caValidity is how long a new CA is valid for.
	caValidity = 10 * 365 * 24 * time.Hour
	// backdate is how far NotBefore is set before "now" to absorb clock skew.
	backdate = time.Minute
	// leafValidity is the default lifetime of a leaf.
	leafValidity = 365 * 24 * time.Hour
	// expiredLeafValidity is the lifetime given to a leaf whose caller set
	// only a NotAfter that is already in the past.
	expiredLeafValidity = time.Hour

	caCertFile = "ca.pem"
	caKeyFile  = "ca-key.pem"

	pemCertificate = "CERTIFICATE"
	pemPrivateKey  = "PRIVATE KEY"
)

// CA is a self-signed ECDSA P-256 certificate authority for one SPIFFE trust
// domain. It is immutable once built and safe for concurrent use.
type CA struct {
	td      spiffeid.TrustDomain
	cert    *x509.Certificate
	certPEM []byte
	key     *ecdsa.PrivateKey
}

// New creates a CA for td whose certificate is valid from one minute before
// now for ten years. The certificate has the subject CN "Cairn dev CA (<td>)",
// the URI SAN spiffe://<td>, key usage CertSign|CRLSign, a path length of
// zero (it signs leaves only) and a random 128-bit serial number.
func New(td spiffeid.TrustDomain, now time.Time) (*CA, error) {
	if td.IsZero() {
		return nil, errors.New("devca: empty trust domain")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("devca: generate CA key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: fmt.Sprintf("Cairn dev CA (%s)", td.Name())},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("devca: create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("devca: parse CA certificate: %w", err)
	}
	return &CA{
		td:      td,
		cert:    cert,
		certPEM: pem.EncodeToMemory(&pem.Block{Type: pemCertificate, Bytes: der}),
		key:     key,
	}, nil
}

// Load reads the CA that [CA.Save] wrote to dir: dir/ca.pem and
// dir/ca-key.pem. It refuses a ca-key.pem that the group or others may
// access, a certificate that is not a self-signed CA with exactly one URI SAN
// naming a trust domain, and a key that does not match the certificate.
// Missing files give an error matching [io/fs.ErrNotExist].
func Load(dir string) (*CA, error) {
	certPath := filepath.Join(dir, caCertFile)
	keyPath := filepath.Join(dir, caKeyFile)

	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("devca: read CA certificate: %w", err)
	}
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("devca: CA certificate %s: %w", certPath, err)
	}
	td, err := caTrustDomain(cert)
	if err != nil {
		return nil, fmt.Errorf("devca: CA certificate %s: %w", certPath, err)
	}

	keyPEM, err := readPrivateFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("devca: read CA key: %w", err)
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("devca: CA key %s: %w", keyPath, err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("devca: CA key %s does not match certificate %s", keyPath, certPath)
	}
	return &CA{td: td, cert: cert, certPEM: certPEM, key: key}, nil
}

// Save writes the CA to dir: the certificate to dir/ca.pem (mode 0644), which
// is also the trust bundle, and the PKCS#8 private key to dir/ca-key.pem
// (mode 0600). dir is created with mode 0700 if missing; an existing dir keeps
// its mode. Each file is written to a temporary file and renamed into place,
// key first, so a crash never leaves a ca.pem without its key.
func (c *CA) Save(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("devca: create CA directory: %w", err)
	}
	keyPEM, err := marshalKeyPEM(c.key)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(dir, caKeyFile), keyPEM, 0o600); err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, caCertFile), c.certPEM, 0o644)
}

// TrustDomain returns the trust domain the CA issues identities in.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.td }

// Certificate returns the CA certificate. Callers must not modify it.
func (c *CA) Certificate() *x509.Certificate { return c.cert }

// BundlePEM returns the PEM-encoded CA certificate: the X.509 trust bundle
// of the trust domain. The returned slice is a copy.
func (c *CA) BundlePEM() []byte { return bytes.Clone(c.certPEM) }

// String describes the CA without any key material.
func (c *CA) String() string {
	return fmt.Sprintf("devca.CA{TrustDomain: %s, NotAfter: %s}", c.td, c.cert.NotAfter.Format(time.RFC3339))
}

// Issue mints an X.509-SVID for id with a fresh ECDSA P-256 key. The
// certificate has exactly one URI SAN (id), is not a CA, has key usage
// DigitalSignature and extended key usages ServerAuth and ClientAuth, so the
// same leaf can serve and dial mutual TLS.
//
// Issue refuses an id outside the CA's trust domain, the trust domain's own
// ID (an SVID needs a path), a validity window that is empty, and a NotAfter
// later than the CA's. See [LeafOptions] for the defaults; a NotAfter in the
// past is allowed and yields an expired certificate, which tests use.
func (c *CA) Issue(id spiffeid.ID, opts LeafOptions) (*Leaf, error) {
	return c.issue(id, opts, time.Now())
}

func (c *CA) issue(id spiffeid.ID, opts LeafOptions, now time.Time) (*Leaf, error) {
	switch {
	case id.IsZero():
		return nil, errors.New("devca: empty SPIFFE ID")
	case !id.MemberOf(c.td):
		return nil, fmt.Errorf("devca: SPIFFE ID %s is not in trust domain %s", id, c.td)
	case id.Path() == "":
		return nil, fmt.Errorf("devca: SPIFFE ID %s has no path", id)
	}

	notBefore, notAfter := opts.NotBefore, opts.NotAfter
	if notAfter.IsZero() {
		notAfter = now.Add(leafValidity)
		if notAfter.After(c.cert.NotAfter) {
			notAfter = c.cert.NotAfter
		}
	}
	if notBefore.IsZero() {
		notBefore = now.Add(-backdate)
		if !notBefore.Before(notAfter) {
			notBefore = notAfter.Add(-expiredLeafValidity)
		}
	}
	switch {
	case !notBefore.Before(notAfter):
		return nil, fmt.Errorf("devca: leaf NotBefore %s is not before NotAfter %s",
			notBefore.Format(time.RFC3339), notAfter.Format(time.RFC3339))
	case notAfter.After(c.cert.NotAfter):
		return nil, fmt.Errorf("devca: leaf NotAfter %s is after the CA's NotAfter %s",
			notAfter.Format(time.RFC3339), c.cert.NotAfter.Format(time.RFC3339))
	}

	dnsNames := opts.DNSNames
	if dnsNames == nil {
		dnsNames = []string{"localhost"}
	}
	ips := opts.IPs
	if ips == nil {
		ips = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("devca: generate leaf key: %w", err)
	}
	skid, err := subjectKeyID(&key.PublicKey)
	if err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               leafSubject(id),
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		SubjectKeyId:          skid,
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              append([]string(nil), dnsNames...),
		IPAddresses:           append([]net.IP(nil), ips...),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, key.Public(), c.key)
	if err != nil {
		return nil, fmt.Errorf("devca: create certificate for %s: %w", id, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("devca: parse certificate for %s: %w", id, err)
	}
	keyPEM, err := marshalKeyPEM(key)
	if err != nil {
		return nil, err
	}
	return &Leaf{
		ID:      id,
		Cert:    cert,
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: pemCertificate, Bytes: der}),
		KeyPEM:  keyPEM,
	}, nil
}

// leafSubject names the leaf by its ID's path when that fits the 64-character
// upper bound RFC 5280 sets for a common name. Peers authorize on the URI
// SAN, never on the subject.
func leafSubject(id spiffeid.ID) pkix.Name {
	name := pkix.Name{Organization: []string{"Cairn dev"}}
	if cn := id.Path()[1:]; len(cn) <= 64 {
		name.CommonName = cn
	}
	return name
}

// caTrustDomain checks that cert is a self-signed CA certificate whose single
// URI SAN is a trust domain's SPIFFE ID and returns that trust domain.
func caTrustDomain(cert *x509.Certificate) (spiffeid.TrustDomain, error) {
	if !cert.IsCA || !cert.BasicConstraintsValid {
		return spiffeid.TrustDomain{}, errors.New("not a CA certificate")
	}
	if len(cert.URIs) != 1 {
		return spiffeid.TrustDomain{}, fmt.Errorf("want exactly one URI SAN, have %d", len(cert.URIs))
	}
	id, err := spiffeid.FromURI(cert.URIs[0])
	if err != nil {
		return spiffeid.TrustDomain{}, fmt.Errorf("URI SAN: %w", err)
	}
	if id.Path() != "" {
		return spiffeid.TrustDomain{}, fmt.Errorf("URI SAN %s is not a trust domain ID", id)
	}
	if err := cert.CheckSignatureFrom(cert); err != nil {
		return spiffeid.TrustDomain{}, fmt.Errorf("not self-signed: %w", err)
	}
	return id.TrustDomain(), nil
}

// randomSerial returns a uniformly random, non-zero 128-bit serial number.
func randomSerial() (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 128)
	for {
		n, err := rand.Int(rand.Reader, limit)
		if err != nil {
			return nil, fmt.Errorf("devca: generate serial number: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}

// subjectKeyID derives a key identifier per RFC 7093 section 2 method 1: the
// leftmost 160 bits of the SHA-256 hash of the subjectPublicKey bits.
func subjectKeyID(pub *ecdsa.PublicKey) ([]byte, error) {
	ecdhPub, err := pub.ECDH()
	if err != nil {
		return nil, fmt.Errorf("devca: encode public key: %w", err)
	}
	sum := sha256.Sum256(ecdhPub.Bytes())
	return sum[:20], nil
}

// parseCertPEM parses data holding exactly one PEM CERTIFICATE block.
func parseCertPEM(data []byte) (*x509.Certificate, error) {
	der, err := singlePEM(data, pemCertificate)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse certificate: %w", err)
	}
	return cert, nil
}

// parseKeyPEM parses data holding exactly one PKCS#8 PEM PRIVATE KEY block
// with an ECDSA P-256 key.
func parseKeyPEM(data []byte) (*ecdsa.PrivateKey, error) {
	der, err := singlePEM(data, pemPrivateKey)
	if err != nil {
		return nil, err
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("parse PKCS#8 private key: %w", err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok || key.Curve != elliptic.P256() {
		return nil, fmt.Errorf("private key is %T, want ECDSA P-256", k)
	}
	return key, nil
}

// singlePEM returns the bytes of the only PEM block in data, which must have
// the given type and no headers, with nothing but whitespace around it.
func singlePEM(data []byte, typ string) ([]byte, error) {
	block, rest := pem.Decode(data)
	switch {
	case block == nil:
		return nil, fmt.Errorf("no PEM %s block", typ)
	case block.Type != typ:
		return nil, fmt.Errorf("PEM block type %q, want %q", block.Type, typ)
	case len(block.Headers) != 0:
		return nil, errors.New("unexpected PEM headers")
	case len(bytes.TrimSpace(rest)) != 0:
		return nil, fmt.Errorf("unexpected data after the PEM %s block", typ)
	}
	return block.Bytes, nil
}

func marshalKeyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("devca: marshal private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemPrivateKey, Bytes: der}), nil
}

// readPrivateFile reads a private key file, refusing one that the group or
// others may access. The mode is taken from the opened file, so it describes
// the bytes read.
func readPrivateFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%s has mode %#o; private keys must not be accessible by group or others (chmod 600 %s)", path, perm, path)
	}
	return io.ReadAll(f)
}
