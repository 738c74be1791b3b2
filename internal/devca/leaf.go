package devca

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"github.com/cairnkms/cairn/internal/atomicfile"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// LeafOptions tunes [CA.Issue]. The zero value gives a leaf valid from one
// minute ago for one year (capped at the CA's NotAfter) that can serve TLS on
// localhost, 127.0.0.1 and ::1.
type LeafOptions struct {
	// NotBefore is the start of the validity window. Zero means one minute
	// before now or, when NotAfter is set and not later than that, one hour
	// before NotAfter, so that setting only a past NotAfter mints an expired
	// certificate.
	NotBefore time.Time
	// NotAfter is the end of the validity window. Zero means one year from
	// now, capped at the CA's NotAfter. It may be in the past.
	NotAfter time.Time
	// DNSNames are the DNS SANs. Nil means "localhost"; an empty, non-nil
	// slice means none.
	DNSNames []string
	// IPs are the IP SANs. Nil means 127.0.0.1 and ::1; an empty, non-nil
	// slice means none.
	IPs []net.IP
}

// Leaf is an X.509-SVID with its private key, as minted by [CA.Issue]. Its
// String, GoString and LogValue methods never print the key.
type Leaf struct {
	// ID is the SPIFFE ID in the certificate's only URI SAN.
	ID spiffeid.ID
	// Cert is the parsed leaf certificate.
	Cert *x509.Certificate
	// CertPEM is Cert as one PEM CERTIFICATE block.
	CertPEM []byte
	// KeyPEM is the ECDSA P-256 private key as one PKCS#8 PEM PRIVATE KEY
	// block. It is secret.
	KeyPEM []byte
}

// TLSCertificate returns the leaf and its key as a [tls.Certificate] for a
// tls.Config's Certificates or GetClientCertificate. The chain is the leaf
// alone: peers hold the CA in their trust bundle.
func (l *Leaf) TLSCertificate() (tls.Certificate, error) {
	cert, err := tls.X509KeyPair(l.CertPEM, l.KeyPEM)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("devca: TLS certificate for %s: %w", l.ID, err)
	}
	return cert, nil
}

// Save writes the certificate to certPath (mode 0644) and the private key to
// keyPath (mode 0600), creating missing parent directories with mode 0700.
// Each file is written to a temporary file and renamed into place, the key
// first.
func (l *Leaf) Save(certPath, keyPath string) error {
	for _, dir := range []string{filepath.Dir(keyPath), filepath.Dir(certPath)} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("devca: create leaf directory: %w", err)
		}
	}
	if err := atomicfile.Write(keyPath, l.KeyPEM, 0o600); err != nil {
		return err
	}
	return atomicfile.Write(certPath, l.CertPEM, 0o644)
}

// String describes the leaf without its key.
func (l *Leaf) String() string {
	if l.Cert == nil {
		return fmt.Sprintf("devca.Leaf{ID: %s}", l.ID)
	}
	return fmt.Sprintf("devca.Leaf{ID: %s, Serial: %x, NotAfter: %s}",
		l.ID, l.Cert.SerialNumber, l.Cert.NotAfter.Format(time.RFC3339))
}

// GoString is String, so that %#v does not print the key either.
func (l *Leaf) GoString() string { return l.String() }

// LogValue implements [slog.LogValuer] without the key.
func (l *Leaf) LogValue() slog.Value {
	attrs := []slog.Attr{slog.String("id", l.ID.String())}
	if l.Cert != nil {
		attrs = append(attrs,
			slog.String("serial", fmt.Sprintf("%x", l.Cert.SerialNumber)),
			slog.Time("not_after", l.Cert.NotAfter))
	}
	return slog.GroupValue(attrs...)
}
