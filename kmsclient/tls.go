package kmsclient

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/credentials"

	"github.com/cairnkms/cairn/internal/identity"
)

// clientIdentity is the client's side of mTLS, from whichever identity
// option was given, and the trust domain its KMS servers must belong to.
type clientIdentity struct {
	td   spiffeid.TrustDomain
	src  *identity.Source // WithIdentityFiles and WithSource
	base *tls.Config      // WithTLSConfig
}

// newIdentity builds the identity route the options name (validate has
// checked that there is exactly one).
func (o *options) newIdentity() (*clientIdentity, error) {
	switch {
	case o.source != nil:
		return &clientIdentity{td: o.source.TrustDomain(), src: o.source}, nil
	case o.tlsConfig != nil:
		td, err := tlsTrustDomain(o.tlsConfig)
		if err != nil {
			return nil, err
		}
		switch cfg := o.tlsConfig; {
		case cfg.InsecureSkipVerify && cfg.VerifyPeerCertificate == nil:
			return nil, errors.New("kmsclient: WithTLSConfig: the config does not authenticate the server (InsecureSkipVerify without VerifyPeerCertificate)")
		case !cfg.InsecureSkipVerify && cfg.RootCAs == nil && cfg.VerifyPeerCertificate == nil:
			// nil RootCAs means the host's system roots: any public or
			// corporate CA willing to put kms/<region>/x in a URI SAN could
			// then pose as a KMS server.
			return nil, errors.New("kmsclient: WithTLSConfig: the config trusts the system root CAs; set RootCAs to the Cairn trust bundle (or verify in VerifyPeerCertificate)")
		}
		return &clientIdentity{td: td, base: o.tlsConfig}, nil
	default:
		return loadFiles(o.files.cert, o.files.key, o.files.bundle, o.logger)
	}
}

// loadFiles is WithIdentityFiles: the trust domain is the certificate's, and
// identity.Source loads, checks and later reloads the three files.
func loadFiles(certFile, keyFile, bundleFile string, log *slog.Logger) (*clientIdentity, error) {
	if certFile == "" || keyFile == "" || bundleFile == "" {
		return nil, fmt.Errorf("kmsclient: WithIdentityFiles(%q, %q, %q): every file must be named", certFile, keyFile, bundleFile)
	}
	id, err := certFileID(certFile)
	if err != nil {
		return nil, err
	}
	src, err := identity.NewSource(identity.SourceConfig{
		CertFile: certFile, KeyFile: keyFile, BundleFile: bundleFile,
		TrustDomain: id.TrustDomain(), Logger: log,
	})
	if err != nil {
		return nil, fmt.Errorf("kmsclient: WithIdentityFiles: %w", err)
	}
	return &clientIdentity{td: id.TrustDomain(), src: src}, nil
}

// certFileID returns the Cairn ID of the first certificate in a PEM file.
func certFileID(path string) (identity.ID, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return identity.ID{}, fmt.Errorf("kmsclient: identity certificate: %w", err)
	}
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return identity.ID{}, fmt.Errorf("kmsclient: identity certificate %s: no PEM CERTIFICATE block", path)
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return identity.ID{}, fmt.Errorf("kmsclient: identity certificate %s: %w", path, err)
		}
		id, err := svidID(cert)
		if err != nil {
			return identity.ID{}, fmt.Errorf("kmsclient: identity certificate %s: %w", path, err)
		}
		return id, nil
	}
}

// tlsTrustDomain returns the trust domain of the client certificate a
// WithTLSConfig config presents.
func tlsTrustDomain(cfg *tls.Config) (spiffeid.TrustDomain, error) {
	var cert *tls.Certificate
	switch {
	case len(cfg.Certificates) > 0:
		cert = &cfg.Certificates[0]
	case cfg.GetClientCertificate != nil:
		// go-spiffe's and identity's configs present the SVID this way;
		// asking once here tells the trust domain.
		c, err := cfg.GetClientCertificate(&tls.CertificateRequestInfo{Version: tls.VersionTLS13})
		if err != nil {
			return spiffeid.TrustDomain{}, fmt.Errorf("kmsclient: WithTLSConfig: GetClientCertificate: %w", err)
		}
		cert = c
	}
	if cert == nil || len(cert.Certificate) == 0 {
		return spiffeid.TrustDomain{}, errors.New("kmsclient: WithTLSConfig: the config presents no client certificate (set Certificates or GetClientCertificate to the client's X.509-SVID)")
	}
	leaf := cert.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return spiffeid.TrustDomain{}, fmt.Errorf("kmsclient: WithTLSConfig: client certificate: %w", err)
		}
	}
	id, err := svidID(leaf)
	if err != nil {
		return spiffeid.TrustDomain{}, fmt.Errorf("kmsclient: WithTLSConfig: client certificate: %w", err)
	}
	return id.TrustDomain(), nil
}

// svidID returns the Cairn ID in a certificate's URI SAN.
func svidID(cert *x509.Certificate) (identity.ID, error) {
	sid, err := x509svid.IDFromCert(cert)
	if err != nil {
		return identity.ID{}, fmt.Errorf("not an X.509-SVID: %w", err)
	}
	return identity.FromSPIFFEID(sid)
}

// serverAuthorizer accepts exactly the KMS servers of region in the
// client's trust domain: kms/<region>/*.
func (ci *clientIdentity) serverAuthorizer(region string) (identity.Authorizer, error) {
	p, err := identity.ParsePattern(identity.TierKMS+"/"+region+"/"+identity.Wildcard, ci.td)
	if err != nil {
		return nil, fmt.Errorf("kmsclient: region %s: %w", region, err)
	}
	return func(id identity.ID) error {
		if p.Match(id) {
			return nil
		}
		return fmt.Errorf("%w: server %s is not a KMS of region %s (want %s)", identity.ErrPermissionDenied, id, region, p)
	}, nil
}

// credentials returns the transport credentials for the endpoints of region:
// the client's certificate, TLS 1.3, and only servers that are KMSs of
// region.
func (ci *clientIdentity) credentials(region string) (credentials.TransportCredentials, error) {
	allow, err := ci.serverAuthorizer(region)
	if err != nil {
		return nil, err
	}
	if ci.src != nil {
		return identity.ClientCredentials(ci.src, allow), nil
	}
	cfg := ci.base.Clone()
	cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS13, tls.VersionTLS13
	prev := cfg.VerifyConnection
	// VerifyConnection runs after cfg's own chain verification (standard or
	// VerifyPeerCertificate), on every handshake, resumed ones included.
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if prev != nil {
			if err := prev(cs); err != nil {
				return err
			}
		}
		if len(cs.PeerCertificates) == 0 {
			return fmt.Errorf("%w: the server presented no certificate", identity.ErrPermissionDenied)
		}
		id, err := svidID(cs.PeerCertificates[0])
		if err != nil {
			return fmt.Errorf("%w: server certificate: %v", identity.ErrPermissionDenied, err)
		}
		return allow(id)
	}
	return identity.NewCredentials(cfg), nil
}
