package devca

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// minRemaining is how long an existing leaf must stay valid for WriteChain
// to keep it.
const minRemaining = 7 * 24 * time.Hour

// Written reports one leaf that [WriteChain] made sure of.
type Written struct {
	// ID is the leaf's SPIFFE ID.
	ID spiffeid.ID
	// CertPath and KeyPath are where the leaf is, as given by [LeafPaths].
	CertPath, KeyPath string
	// Reused is true if the leaf already on disk was kept, false if it was
	// issued now.
	Reused bool
}

// WriteChain makes dir hold a CA and a leaf for every identity of p, valid
// at now, and returns the CA and one Written per [Plan.IDs], in that order.
// dir/ca.pem is the trust bundle.
//
// It is idempotent. If dir/ca.pem exists the CA is loaded with [Load] and
// reused; it is an error if it belongs to another trust domain or is not
// valid at now. Otherwise a new CA is created and saved. An existing leaf is
// kept if it is an X.509-SVID for its ID that verifies against the CA at
// now, stays valid for at least 7 more days, and has a key file, readable by
// its owner only, that matches the certificate; any other leaf is issued
// anew, valid for a year (capped at the CA's NotAfter), and written with
// [Leaf.Save].
//
// WriteChain does not lock dir: concurrent calls on the same dir race.
func WriteChain(dir string, p Plan, now time.Time) (*CA, []Written, error) {
	if err := p.Validate(); err != nil {
		return nil, nil, err
	}
	ca, err := loadOrCreate(dir, p.TrustDomain, now)
	if err != nil {
		return nil, nil, err
	}
	bundle := x509bundle.FromX509Authorities(ca.td, []*x509.Certificate{ca.cert})

	ids := p.IDs()
	written := make([]Written, 0, len(ids))
	for _, id := range ids {
		certPath, keyPath := LeafPaths(dir, id)
		w := Written{ID: id, CertPath: certPath, KeyPath: keyPath}
		if keepLeaf(certPath, keyPath, id, bundle, now) {
			w.Reused = true
		} else {
			leaf, err := ca.issue(id, LeafOptions{}, now)
			if err != nil {
				return nil, nil, err
			}
			if err := leaf.Save(certPath, keyPath); err != nil {
				return nil, nil, err
			}
		}
		written = append(written, w)
	}
	return ca, written, nil
}

// loadOrCreate loads the CA in dir, or creates and saves one if dir/ca.pem
// does not exist.
func loadOrCreate(dir string, td spiffeid.TrustDomain, now time.Time) (*CA, error) {
	_, err := os.Stat(filepath.Join(dir, caCertFile))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		ca, err := New(td, now)
		if err != nil {
			return nil, err
		}
		if err := ca.Save(dir); err != nil {
			return nil, err
		}
		return ca, nil
	case err != nil:
		return nil, fmt.Errorf("devca: %w", err)
	}

	ca, err := Load(dir)
	if err != nil {
		return nil, err
	}
	switch {
	case ca.td != td:
		return nil, fmt.Errorf("devca: CA in %s is for trust domain %q, not %q; use another directory or remove it",
			dir, ca.td.Name(), td.Name())
	case now.Before(ca.cert.NotBefore) || now.After(ca.cert.NotAfter):
		return nil, fmt.Errorf("devca: CA in %s is valid from %s to %s, not at %s; remove the directory to start a new chain",
			dir, ca.cert.NotBefore.Format(time.RFC3339), ca.cert.NotAfter.Format(time.RFC3339), now.Format(time.RFC3339))
	}
	return ca, nil
}

// keepLeaf reports whether the leaf at certPath and keyPath can stay: see
// WriteChain. Any problem, including a missing file, means no.
func keepLeaf(certPath, keyPath string, id spiffeid.ID, bundle *x509bundle.Bundle, now time.Time) bool {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return false
	}
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return false
	}
	got, _, err := x509svid.Verify([]*x509.Certificate{cert}, bundle, x509svid.WithTime(now))
	if err != nil || got != id || cert.NotAfter.Sub(now) < minRemaining {
		return false
	}
	keyPEM, err := readPrivateFile(keyPath)
	if err != nil {
		return false
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return false
	}
	return key.PublicKey.Equal(cert.PublicKey)
}
