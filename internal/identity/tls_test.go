package identity_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
)

const (
	serverID = "spiffe://cairn.test/kms/us-east/kms-1"
	clientID = "spiffe://cairn.test/client/us-east/demo"
	checkRPC = "/grpc.health.v1.Health/Check"
)

// recorder is a real gRPC service whose handler records the caller identity
// it finds in its context.
type recorder struct {
	healthpb.UnimplementedHealthServer
	mu    sync.Mutex
	calls []identity.ID
}

func (r *recorder) Check(ctx context.Context, _ *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	id, _ := identity.FromContext(ctx)
	r.mu.Lock()
	r.calls = append(r.calls, id)
	r.mu.Unlock()
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

func (r *recorder) seen() []identity.ID {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]identity.ID(nil), r.calls...)
}

// serve starts a gRPC server on 127.0.0.1:0 with creds, the identity
// interceptor and policy, and returns its address and handler recorder.
func serve(t *testing.T, creds credentials.TransportCredentials, policy identity.Policy) (string, *recorder) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(creds),
		grpc.ChainUnaryInterceptor(identity.UnaryServerInterceptor(), identity.UnaryAuthorizeInterceptor(policy)))
	rec := &recorder{}
	healthpb.RegisterHealthServer(srv, rec)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	return lis.Addr().String(), rec
}

func call(t *testing.T, addr string, creds credentials.TransportCredentials) error {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

func allowAll() identity.Policy { return identity.Policy{checkRPC: identity.AllowAny()} }

func TestPeerIdentityReachesHandler(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	addr, rec := serve(t, pki.ServerCredentials(serverID), allowAll())
	if err := call(t, addr, pki.ClientCredentials(clientID)); err != nil {
		t.Fatalf("Check = %v, want success", err)
	}
	got := rec.seen()
	if len(got) != 1 || got[0].String() != clientID {
		t.Fatalf("handler saw identities %v, want [%s]", got, clientID)
	}
}

// TestRefusedClients shows each kind of bad client is refused by a real
// gRPC server and never reaches the handler.
func TestRefusedClients(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	otherCA := identitytest.New(t, identitytest.TrustDomain) // same trust domain, another CA
	otherTD := identitytest.New(t, spiffeid.RequireTrustDomainFromString("evil.test"))
	bundle := pki.Bundle()
	serverOK := tlsconfig.AuthorizeAny()

	withCert := func(cert tls.Certificate) *tls.Config {
		cfg := tlsconfig.TLSClientConfig(bundle, serverOK)
		cfg.MinVersion = tls.VersionTLS13
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
		return cfg
	}
	valid := pki.TLSCertificate(clientID, devca.LeafOptions{})

	tests := []struct {
		name     string
		client   *tls.Config
		policy   identity.Policy
		wantCode codes.Code
	}{
		{
			name: "no client certificate",
			client: func() *tls.Config {
				cfg := tlsconfig.TLSClientConfig(bundle, serverOK)
				cfg.MinVersion = tls.VersionTLS13
				return cfg
			}(),
			wantCode: codes.Unavailable,
		},
		{
			name:     "certificate from another CA",
			client:   withCert(otherCA.TLSCertificate(clientID, devca.LeafOptions{})),
			wantCode: codes.Unavailable,
		},
		{
			name:     "certificate of another trust domain",
			client:   withCert(otherTD.TLSCertificate("spiffe://evil.test/client/us-east/demo", devca.LeafOptions{})),
			wantCode: codes.Unavailable,
		},
		{
			name: "expired certificate",
			client: withCert(pki.TLSCertificate(clientID, devca.LeafOptions{
				NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour),
			})),
			wantCode: codes.Unavailable,
		},
		{
			name: "not yet valid certificate",
			client: withCert(pki.TLSCertificate(clientID, devca.LeafOptions{
				NotBefore: time.Now().Add(time.Hour), NotAfter: time.Now().Add(48 * time.Hour),
			})),
			wantCode: codes.Unavailable,
		},
		{
			name: "TLS 1.2 only",
			client: func() *tls.Config {
				cfg := withCert(valid)
				cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
				return cfg
			}(),
			wantCode: codes.Unavailable,
		},
		{
			name:     "wrong SPIFFE ID for the method",
			client:   withCert(pki.TLSCertificate("spiffe://cairn.test/kms/us-east-evil/x", devca.LeafOptions{})),
			policy:   identity.Policy{checkRPC: identity.NewAllowlist(identity.MustParsePattern("kms/us-east/*", identitytest.TrustDomain)).Authorize},
			wantCode: codes.PermissionDenied,
		},
		{
			name:     "method without a policy",
			client:   withCert(valid),
			policy:   identity.Policy{"/grpc.health.v1.Health/Watch": identity.AllowAny()},
			wantCode: codes.PermissionDenied,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			policy := tt.policy
			if policy == nil {
				policy = allowAll()
			}
			addr, rec := serve(t, pki.ServerCredentials(serverID), policy)
			err := call(t, addr, credentials.NewTLS(tt.client))
			if got := status.Code(err); got != tt.wantCode {
				t.Errorf("Check = %v, want code %v", err, tt.wantCode)
			}
			if seen := rec.seen(); len(seen) != 0 {
				t.Errorf("handler ran for %v, want no call", seen)
			}
		})
	}
}

// TestServerHandshakeReasons checks, at the TLS layer over real TCP, that the
// server refuses each bad client for the right reason.
func TestServerHandshakeReasons(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	otherCA := identitytest.New(t, identitytest.TrustDomain)
	serverCfg := identity.ServerTLSConfig(pki.Source(serverID),
		identity.NewAllowlist(identity.MustParsePattern("client/*/*", identitytest.TrustDomain)).Authorize)
	bundle := pki.Bundle()

	clientCfg := func(cert *tls.Certificate, maxVersion uint16) *tls.Config {
		cfg := tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeAny())
		cfg.MaxVersion = maxVersion
		if cert != nil {
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
		}
		return cfg
	}
	cert := func(ca *identitytest.PKI, id string, opts devca.LeafOptions) *tls.Certificate {
		c := ca.TLSCertificate(id, opts)
		return &c
	}
	tests := []struct {
		name       string
		client     *tls.Config
		wantServer string // substring of the server's handshake error; "" = success
	}{
		{"valid", clientCfg(cert(pki, clientID, devca.LeafOptions{}), tls.VersionTLS13), ""},
		{"no certificate", clientCfg(nil, tls.VersionTLS13), "client didn't provide a certificate"},
		{"another CA", clientCfg(cert(otherCA, clientID, devca.LeafOptions{}), tls.VersionTLS13), "certificate signed by unknown authority"},
		{"expired", clientCfg(cert(pki, clientID, devca.LeafOptions{NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour)}), tls.VersionTLS13), "expired"},
		{"identity not allowed at the connection", clientCfg(cert(pki, "spiffe://cairn.test/officer/global/officer-1", devca.LeafOptions{}), tls.VersionTLS13), "not on the allowlist"},
		{"TLS 1.2", clientCfg(cert(pki, clientID, devca.LeafOptions{}), tls.VersionTLS12), "client offered only unsupported versions"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			serverErr := handshake(t, serverCfg, tt.client)
			switch {
			case tt.wantServer == "" && serverErr != nil:
				t.Fatalf("server handshake = %v, want success", serverErr)
			case tt.wantServer != "" && (serverErr == nil || !strings.Contains(serverErr.Error(), tt.wantServer)):
				t.Fatalf("server handshake = %v, want an error containing %q", serverErr, tt.wantServer)
			}
		})
	}
}

// handshake runs a TLS handshake over loopback TCP and returns the server's
// error.
func handshake(t *testing.T, serverCfg, clientCfg *tls.Config) error {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	result := make(chan error, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			result <- err
			return
		}
		defer c.Close()
		s := tls.Server(c, serverCfg)
		s.SetDeadline(time.Now().Add(10 * time.Second))
		result <- s.Handshake()
	}()
	c, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cl := tls.Client(c, clientCfg)
	cl.SetDeadline(time.Now().Add(10 * time.Second))
	if err := cl.Handshake(); err == nil {
		// In TLS 1.3 the client learns of a refused certificate only when it
		// reads; the read also lets the server finish.
		_, _ = cl.Read(make([]byte, 1))
	}
	c.Close()
	return <-result
}

func TestClientRefusesWrongServerID(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	addr, rec := serve(t, pki.ServerCredentials(serverID), allowAll())
	onlyRootKMS := identity.NewAllowlist(identity.MustParsePattern("rootkms/*/*", identitytest.TrustDomain)).Authorize
	err := call(t, addr, identity.ClientCredentials(pki.Source(clientID), onlyRootKMS))
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "not on the allowlist") {
		t.Errorf("Check against a KMS when expecting a root KMS = %v, want Unavailable naming the allowlist", err)
	}
	if len(rec.seen()) != 0 {
		t.Errorf("handler ran, want no call")
	}
}

// TestPlainTLSCredentialsYieldNoIdentity shows that a server wired with plain
// gRPC TLS credentials cannot hand an unverified identity to handlers.
func TestPlainTLSCredentialsYieldNoIdentity(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	plain := credentials.NewTLS(identity.ServerTLSConfig(pki.Source(serverID), identity.AllowAny()))
	addr, rec := serve(t, plain, allowAll())
	err := call(t, addr, pki.ClientCredentials(clientID))
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("Check = %v, want Unauthenticated", err)
	}
	if len(rec.seen()) != 0 {
		t.Errorf("handler ran, want no call")
	}
}

func TestSourceReload(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	_, certFile, keyFile := pki.Issue(serverID, devca.LeafOptions{})
	src, err := identity.NewSource(identity.SourceConfig{
		CertFile: certFile, KeyFile: keyFile, BundleFile: pki.BundleFile(),
		TrustDomain: identitytest.TrustDomain, CheckInterval: -1,
	})
	if err != nil {
		t.Fatal(err)
	}
	first, _ := src.GetX509SVID()

	// A renewed certificate on disk is picked up without a restart.
	renewed, _, _ := pki.Issue(serverID, devca.LeafOptions{})
	if err := src.Reload(); err != nil {
		t.Fatalf("Reload = %v", err)
	}
	got, _ := src.GetX509SVID()
	if got.Certificates[0].SerialNumber.Cmp(renewed.Cert.SerialNumber) != 0 {
		t.Fatalf("after Reload serial = %v, want the renewed %v (was %v)", got.Certificates[0].SerialNumber, renewed.Cert.SerialNumber, first.Certificates[0].SerialNumber)
	}
	// And new connections present it.
	addr, _ := serve(t, identity.ServerCredentials(src, identity.AllowAny()), allowAll())
	servedSerial := func() string {
		cfg := identity.StaticClientTLSConfig(pki.TLSCertificate(clientID, devca.LeafOptions{}), pki.Bundle(), identity.AllowAny())
		c, err := tls.Dial("tcp", addr, cfg)
		if err != nil {
			t.Fatalf("Dial = %v", err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].SerialNumber.String()
	}
	if got := servedSerial(); got != renewed.Cert.SerialNumber.String() {
		t.Errorf("served serial = %s, want %s", got, renewed.Cert.SerialNumber)
	}

	// A half-written certificate is refused and the previous one kept.
	if err := os.WriteFile(certFile, []byte("-----BEGIN CERTIFICATE-----\ngarbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := src.Reload(); err == nil {
		t.Errorf("Reload(garbage certificate) = nil, want error")
	}
	if got := servedSerial(); got != renewed.Cert.SerialNumber.String() {
		t.Errorf("after a failed reload served serial = %s, want the previous %s", got, renewed.Cert.SerialNumber)
	}

	// A certificate for another identity is refused: identity is fixed.
	other, _ := pki.CA.Issue(spiffeid.RequireFromString("spiffe://cairn.test/kms/us-east/kms-2"), devca.LeafOptions{})
	if err := other.Save(certFile, keyFile); err != nil {
		t.Fatal(err)
	}
	if err := src.Reload(); err == nil || !strings.Contains(err.Error(), "changed identity") {
		t.Errorf("Reload(other identity) = %v, want a changed-identity error", err)
	}
	if src.ID().String() != serverID {
		t.Errorf("ID() = %s after refused reload, want %s", src.ID(), serverID)
	}
}

func TestSourceAutomaticReload(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	_, certFile, keyFile := pki.Issue(serverID, devca.LeafOptions{})
	now := time.Now()
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	src, err := identity.NewSource(identity.SourceConfig{
		CertFile: certFile, KeyFile: keyFile, BundleFile: pki.BundleFile(),
		TrustDomain: identitytest.TrustDomain, CheckInterval: time.Minute, Now: clock,
	})
	if err != nil {
		t.Fatal(err)
	}
	renewed, _, _ := pki.Issue(serverID, devca.LeafOptions{})
	if got, _ := src.GetX509SVID(); got.Certificates[0].SerialNumber.Cmp(renewed.Cert.SerialNumber) == 0 {
		t.Fatalf("reloaded before the check interval passed")
	}
	mu.Lock()
	now = now.Add(2 * time.Minute)
	mu.Unlock()
	if got, _ := src.GetX509SVID(); got.Certificates[0].SerialNumber.Cmp(renewed.Cert.SerialNumber) != 0 {
		t.Errorf("GetX509SVID after the check interval serial = %v, want the renewed %v", got.Certificates[0].SerialNumber, renewed.Cert.SerialNumber)
	}
}

func TestNewSourceRefuses(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	other := identitytest.New(t, identitytest.TrustDomain)
	_, certFile, keyFile := pki.Issue(serverID, devca.LeafOptions{})
	_, otherCert, otherKey := other.Issue(serverID, devca.LeafOptions{})
	_, expiredCert, expiredKey := pki.Issue("spiffe://cairn.test/kms/us-east/old", devca.LeafOptions{NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour)})
	looseKey := t.TempDir() + "/key.pem"
	data, _ := os.ReadFile(keyFile)
	os.WriteFile(looseKey, data, 0o644)

	tests := []struct {
		name string
		cfg  identity.SourceConfig
		want string
	}{
		{"empty config", identity.SourceConfig{}, "no certificate file"},
		{"missing file", identity.SourceConfig{CertFile: "/nonexistent", KeyFile: keyFile, BundleFile: pki.BundleFile(), TrustDomain: identitytest.TrustDomain}, "no such file"},
		{"key readable by others", identity.SourceConfig{CertFile: certFile, KeyFile: looseKey, BundleFile: pki.BundleFile(), TrustDomain: identitytest.TrustDomain}, "chmod 600"},
		{"another CA", identity.SourceConfig{CertFile: otherCert, KeyFile: otherKey, BundleFile: pki.BundleFile(), TrustDomain: identitytest.TrustDomain}, "does not verify"},
		{"expired", identity.SourceConfig{CertFile: expiredCert, KeyFile: expiredKey, BundleFile: pki.BundleFile(), TrustDomain: identitytest.TrustDomain}, "expired"},
		{"another trust domain", identity.SourceConfig{CertFile: certFile, KeyFile: keyFile, BundleFile: pki.BundleFile(), TrustDomain: spiffeid.RequireTrustDomainFromString("other.test")}, "not in trust domain"},
		{"key of another cert", identity.SourceConfig{CertFile: certFile, KeyFile: otherKey, BundleFile: pki.BundleFile(), TrustDomain: identitytest.TrustDomain}, "loading"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := identity.NewSource(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("NewSource = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func TestFromPeerWithoutPeer(t *testing.T) {
	if _, err := identity.FromPeer(context.Background()); err == nil {
		t.Errorf("FromPeer(no peer) = nil error, want error")
	}
	if _, ok := identity.FromContext(context.Background()); ok {
		t.Errorf("FromContext(empty) ok = true, want false")
	}
	var denied error = identity.AllowAny()(identity.ID{})
	if !errors.Is(denied, identity.ErrPermissionDenied) {
		t.Errorf("AllowAny()(zero ID) = %v, want ErrPermissionDenied", denied)
	}
}

// TestNoSessionResumption: Go skips VerifyPeerCertificate (go-spiffe's SVID
// check and our authorizer) on resumed TLS sessions, so a server must never
// resume one: every connection is fully verified against the current bundle.
func TestNoSessionResumption(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	serverCfg := identity.ServerTLSConfig(pki.Source(serverID), identity.AllowAny())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			s := tls.Server(c, serverCfg)
			if s.Handshake() == nil {
				s.Write([]byte("x")) // lets the client read the session ticket, if one is sent
			}
			s.Close()
		}
	}()
	clientCfg := identity.StaticClientTLSConfig(pki.TLSCertificate(clientID, devca.LeafOptions{}), pki.Bundle(), identity.AllowAny())
	clientCfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
	for i := range 2 {
		c, err := tls.Dial("tcp", lis.Addr().String(), clientCfg)
		if err != nil {
			t.Fatalf("Dial %d = %v", i, err)
		}
		c.Read(make([]byte, 1))
		if c.ConnectionState().DidResume {
			t.Errorf("connection %d resumed a TLS session; want a full, verified handshake every time", i)
		}
		c.Close()
	}
}
