package kms_test

import (
	"context"
	"crypto/ed25519"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	region   = "us-east"
	ledger   = "payments/ledger"
	appID    = "spiffe://cairn.test/client/us-east/app"
	otherID  = "spiffe://cairn.test/client/us-east/intruder"
	adminID  = kmstest.CreatedBy
	kms1ID   = "spiffe://cairn.test/kms/us-east/kms-1"
	kms2ID   = "spiffe://cairn.test/kms/us-east/kms-2"
	decryptM = "kms: ciphertext does not decrypt"
)

// t0 is the tests' clock start.
var t0 = time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)

// clock is a settable Config.Now.
type clock struct{ ns atomic.Int64 }

func newClock() *clock                   { c := &clock{}; c.ns.Store(t0.UnixNano()); return c }
func (c *clock) Now() time.Time          { return time.Unix(0, c.ns.Load()).UTC() }
func (c *clock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// env is one region's world: a test PKI, region keys, a bundle signer and a
// keyset the client app may use for everything.
type env struct {
	t      *testing.T
	pki    *identitytest.PKI
	keys   *kmstest.RegionKeys
	signer *kmstest.Signer
	ks     *kmstest.Keyset
	serial uint64
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, pki: identitytest.New(t, identitytest.TrustDomain), keys: kmstest.NewRegionKeys(), signer: kmstest.NewSigner(t)}
	e.keys.AddVersion(t, region)
	e.ks = kmstest.NewKeyset(t, ledger, kmstest.ACL("client/us-east/app"))
	return e
}

// bundle signs the next serial's bundle holding kss.
func (e *env) bundle(kss ...*kmstest.Keyset) *bundlev1.SignedBundle {
	e.t.Helper()
	e.serial++
	return e.signer.Sign(e.t, kmstest.Bundle(e.t, e.keys, region, e.serial, kss...))
}

// emptied signs the next serial's bundle without keysets. Dropping every
// keyset is past the shrink guard, so it carries a shrink override: what is
// left to refuse it is the Safety Condition, which no override overrides.
func (e *env) emptied() *bundlev1.SignedBundle {
	e.t.Helper()
	e.serial++
	b := kmstest.Bundle(e.t, e.keys, region, e.serial)
	b.ShrinkOverride = &bundlev1.ShrinkOverride{Reason: "test: drop every keyset", ForcedBy: adminID}
	return e.signer.Sign(e.t, b)
}

type server struct {
	*kms.Server
	addr      string
	dir       string
	auditPath string
	clock     *clock
	admin     kmsv1.KMSAdminClient
}

type serverOpt func(*kms.Config)

// start starts a KMS server with identity id and state dir dir ("" : new).
func (e *env) start(id, dir string, opts ...serverOpt) *server {
	t := e.t
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	auditPath := filepath.Join(t.TempDir(), "audit.log")
	alog, err := audit.Open(auditPath, audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	c := newClock()
	cfg := kms.Config{
		Region: region, StateDir: dir, Source: e.pki.Source(id), RegionKeys: e.keys,
		SigningKeys: []ed25519.PublicKey{e.signer.Public}, Audit: alog, Now: c.Now,
		Logger:   slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
		RetryMin: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond,
	}
	for _, o := range opts {
		o(&cfg)
	}
	srv, err := kms.New(cfg)
	if err != nil {
		t.Fatalf("kms.New = %v", err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(lis); err != nil {
		t.Fatalf("Start = %v", err)
	}
	s := &server{Server: srv, addr: lis.Addr().String(), dir: dir, auditPath: auditPath, clock: c}
	t.Cleanup(func() {
		srv.Close()
		alog.Close()
	})
	s.admin = kmsv1.NewKMSAdminClient(e.conn(adminID, s.addr))
	return s
}

// conn dials addr as id.
func (e *env) conn(id, addr string, opts ...grpc.DialOption) *grpc.ClientConn {
	e.t.Helper()
	cc, err := grpc.NewClient(addr, append([]grpc.DialOption{grpc.WithTransportCredentials(e.pki.ClientCredentials(id))}, opts...)...)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { cc.Close() })
	return cc
}

func (e *env) client(id string, s *server) kmsv1.KMSClient {
	return kmsv1.NewKMSClient(e.conn(id, s.addr))
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// apply applies sb and fails the test on error.
func (e *env) apply(s *server, sb *bundlev1.SignedBundle) *kmsv1.ApplyBundleResponse {
	e.t.Helper()
	resp, err := s.admin.ApplyBundle(ctx(e.t), &kmsv1.ApplyBundleRequest{Bundle: sb})
	if err != nil {
		e.t.Fatalf("ApplyBundle(serial %d) = %v", e.serial, err)
	}
	return resp
}

// status returns the server's status with usage.
func (s *server) status(t *testing.T) *kmsv1.GetStatusResponse {
	t.Helper()
	st, err := s.admin.GetStatus(ctx(t), &kmsv1.GetStatusRequest{IncludeKeysets: true})
	if err != nil {
		t.Fatalf("GetStatus = %v", err)
	}
	return st
}

// persisted returns the bytes of the server's bundle file (nil if none).
func (s *server) persisted(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(s.dir, kms.BundleFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// waitReady waits until s serves.
func waitReady(t *testing.T, s *server) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !s.Ready() {
		if time.Now().After(deadline) {
			st, reason := s.State()
			t.Fatalf("server never became ready: %v: %s", st, reason)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func refEqual(a, b *bundlev1.BundleRef) bool { return proto.Equal(a, b) }

func encrypt(t *testing.T, c kmsv1.KMSClient, keyset string, pt, ad []byte) *kmsv1.EncryptResponse {
	t.Helper()
	r, err := c.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: keyset, Plaintext: pt, AssociatedData: ad})
	if err != nil {
		t.Fatalf("Encrypt(%s) = %v", keyset, err)
	}
	return r
}

func decrypt(t *testing.T, c kmsv1.KMSClient, keyset string, ct, ad []byte) *kmsv1.DecryptResponse {
	t.Helper()
	r, err := c.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: keyset, Ciphertext: ct, AssociatedData: ad})
	if err != nil {
		t.Fatalf("Decrypt(%s) = %v", keyset, err)
	}
	return r
}
