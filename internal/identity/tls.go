package identity

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ServerTLSConfig returns a TLS 1.3-only server configuration that presents
// the source's certificate, requires a client certificate, verifies it as an
// X.509-SVID against the source's trust bundle (chain, expiry, SVID rules)
// and lets the handshake complete only if allow accepts the client's ID.
// allow is the coarse, connection-level gate (typically MemberOf the trust
// domain); per-method decisions belong to an Authorize interceptor.
//
// Session resumption is off: Go does not call VerifyPeerCertificate (where
// the SVID check and allow run) on a resumed session, so resuming would let a
// client skip authorization and any trust-bundle change for the ticket's
// lifetime. gRPC connections are long-lived, so the cost is small.
func ServerTLSConfig(src *Source, allow Authorizer) *tls.Config {
	cfg := tlsconfig.MTLSServerConfig(src, src, spiffeAuthorizer(allow))
	cfg.SessionTicketsDisabled = true
	pinTLS13(cfg)
	return cfg
}

// ClientTLSConfig returns a TLS 1.3-only client configuration that presents
// the source's certificate and accepts the server only if its certificate is
// an X.509-SVID of the trust bundle whose ID allow accepts. Host names are not
// checked: the server's SPIFFE ID is what is authenticated.
func ClientTLSConfig(src *Source, allow Authorizer) *tls.Config {
	cfg := tlsconfig.MTLSClientConfig(src, src, spiffeAuthorizer(allow))
	pinTLS13(cfg)
	return cfg
}

// StaticClientTLSConfig is ClientTLSConfig for a fixed certificate and trust
// bundle, without reloading. Tools that run once (and tests) use it.
func StaticClientTLSConfig(cert tls.Certificate, bundle *x509bundle.Bundle, allow Authorizer) *tls.Config {
	cfg := tlsconfig.TLSClientConfig(bundle, spiffeAuthorizer(allow))
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	pinTLS13(cfg)
	return cfg
}

func pinTLS13(cfg *tls.Config) {
	cfg.MinVersion = tls.VersionTLS13
	cfg.MaxVersion = tls.VersionTLS13
}

// spiffeAuthorizer adapts an Authorizer to go-spiffe's handshake callback,
// which runs only after the chain verified against the bundle.
func spiffeAuthorizer(allow Authorizer) tlsconfig.Authorizer {
	return func(sid spiffeid.ID, _ [][]*x509.Certificate) error {
		id, err := FromSPIFFEID(sid)
		if err != nil {
			return err
		}
		if allow == nil {
			return fmt.Errorf("%w: no authorizer configured", ErrPermissionDenied)
		}
		return allow(id)
	}
}

// peerID extracts the SPIFFE ID of a peer's leaf certificate. Callers must
// only use it on a connection whose handshake verified the chain.
func peerID(state tls.ConnectionState) (ID, error) {
	if len(state.PeerCertificates) == 0 {
		return ID{}, fmt.Errorf("%w: peer presented no certificate", ErrPermissionDenied)
	}
	sid, err := x509svid.IDFromCert(state.PeerCertificates[0])
	if err != nil {
		return ID{}, fmt.Errorf("%w: %v", ErrInvalidID, err)
	}
	return FromSPIFFEID(sid)
}
