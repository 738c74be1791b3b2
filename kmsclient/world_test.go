package kmsclient_test

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	"github.com/cairnkms/cairn/kmsclient"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The test world: two regions of trust domain cairn.test, whose KMS servers
// serve the keyset payments/ledger (one Tink keyset, encrypted under each
// region's key), which the client identity appID may use.
const (
	east       = "us-east"
	west       = "us-west"
	ledger     = "payments/ledger"
	appID      = "spiffe://cairn.test/client/us-east/app"
	intruderID = "spiffe://cairn.test/client/us-east/intruder"
)

// world is a test PKI, region keys for both regions, a bundle signer and the
// keysets each region's bundle holds.
type world struct {
	tb      testing.TB
	pki     *identitytest.PKI
	keys    *kmstest.RegionKeys
	signer  *kmstest.Signer
	ledger  *kmstest.Keyset
	keysets map[string][]*kmstest.Keyset
	log     *slog.Logger // the servers' logger
	// clientLog is the clients' logger (a WithLogger option of the test
	// overrides it).
	clientLog *slog.Logger
}

func newWorld(tb testing.TB) *world {
	tb.Helper()
	w := &world{
		tb: tb, pki: identitytest.New(tb, identitytest.TrustDomain),
		keys: kmstest.NewRegionKeys(), signer: kmstest.NewSigner(tb),
		log: slog.New(slog.DiscardHandler), clientLog: slog.New(slog.DiscardHandler),
	}
	w.keys.AddVersion(tb, east)
	w.keys.AddVersion(tb, west)
	w.ledger = kmstest.NewKeyset(tb, ledger, kmstest.ACL("client/us-east/app"))
	w.keysets = map[string][]*kmstest.Keyset{east: {w.ledger}, west: {w.ledger}}
	return w
}

// testWorld is newWorld with the servers logging warnings to the test.
func testWorld(t *testing.T) *world {
	t.Helper()
	w := newWorld(t)
	w.log = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	w.clientLog = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	return w
}

// kmsServer is a regional KMS server running in-process on loopback.
type kmsServer struct {
	*kms.Server
	id        string
	addr      string
	auditPath string
}

// startKMS starts KMS server kms/<region>/<name>, booting from a signed
// bundle (serial 1) of the region's keysets persisted in its state
// directory, and waits until it serves. It is closed at cleanup.
func (w *world) startKMS(region, name string) *kmsServer {
	tb := w.tb
	tb.Helper()
	sb := w.signer.Sign(tb, kmstest.Bundle(tb, w.keys, region, 1, w.keysets[region]...))
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(sb)
	if err != nil {
		tb.Fatal(err)
	}
	dir := tb.TempDir()
	if err := os.WriteFile(filepath.Join(dir, kms.BundleFile), data, 0o600); err != nil {
		tb.Fatal(err)
	}
	auditPath := filepath.Join(tb.TempDir(), "audit.log")
	alog, err := audit.Open(auditPath, audit.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	id := fmt.Sprintf("spiffe://cairn.test/kms/%s/%s", region, name)
	srv, err := kms.New(kms.Config{
		Region: region, StateDir: dir, Source: w.pki.Source(id), RegionKeys: w.keys,
		SigningKeys: []ed25519.PublicKey{w.signer.Public}, Audit: alog, Logger: w.log.With("server", id),
	})
	if err != nil {
		alog.Close()
		tb.Fatalf("kms.New(%s) = %v", id, err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		alog.Close()
		tb.Fatal(err)
	}
	if err := srv.Start(lis); err != nil {
		alog.Close()
		tb.Fatalf("Start(%s) = %v", id, err)
	}
	tb.Cleanup(func() {
		srv.Close()
		alog.Close()
	})
	deadline := time.Now().Add(20 * time.Second)
	for !srv.Ready() {
		if time.Now().After(deadline) {
			st, reason := srv.State()
			tb.Fatalf("KMS %s not ready after 20s: %v: %s", id, st, reason)
		}
		time.Sleep(2 * time.Millisecond)
	}
	return &kmsServer{Server: srv, id: id, addr: lis.Addr().String(), auditPath: auditPath}
}

// dataPlaneCalls returns how many Encrypt and Decrypt calls the server has
// audited, by outcome ("ok", "error", "denied").
func (s *kmsServer) dataPlaneCalls(tb testing.TB) map[string]int {
	tb.Helper()
	recs, err := audit.ReadFile(s.auditPath)
	if err != nil {
		tb.Fatalf("audit.ReadFile(%s) = %v", s.id, err)
	}
	out := map[string]int{}
	for _, r := range recs {
		if strings.HasSuffix(r.Operation, "KMS/Encrypt") || strings.HasSuffix(r.Operation, "KMS/Decrypt") {
			out[string(r.Outcome)]++
		}
	}
	return out
}

// addrs returns the servers' addresses.
func addrs(ss ...*kmsServer) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = s.addr
	}
	return out
}

// client returns a client with identity id (WithSource) and opts, closed at
// cleanup.
func (w *world) client(id string, opts ...kmsclient.Option) *kmsclient.Client {
	tb := w.tb
	tb.Helper()
	// Listed order: tests name which endpoint is in use first.
	c, err := kmsclient.New(append([]kmsclient.Option{kmsclient.WithSource(w.pki.Source(id)), kmsclient.WithLogger(w.clientLog), kmsclient.WithListedOrder()}, opts...)...)
	if err != nil {
		tb.Fatalf("kmsclient.New = %v", err)
	}
	tb.Cleanup(func() {
		if err := c.Close(); err != nil {
			tb.Errorf("Client.Close() = %v", err)
		}
	})
	return c
}

// aeadOf returns c's AEAD of keyset in region.
func aeadOf(tb testing.TB, c *kmsclient.Client, region, keyset string) *kmsclient.AEAD {
	tb.Helper()
	a, err := c.AEAD(region, keyset)
	if err != nil {
		tb.Fatalf("AEAD(%s, %s) = %v", region, keyset, err)
	}
	return a
}

// ctxFor returns a context that ends with the test (or after a minute).
func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// deadAddr returns a loopback address nothing listens on (connections are
// refused).
func deadAddr(tb testing.TB) string {
	tb.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	return addr
}

// hungListener accepts TCP connections and never answers: a wedged server.
type hungListener struct {
	lis   net.Listener
	mu    sync.Mutex
	conns []net.Conn
	done  chan struct{}
}

func newHungListener(tb testing.TB) *hungListener {
	tb.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	h := &hungListener{lis: lis, done: make(chan struct{})}
	go func() {
		defer close(h.done)
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			h.mu.Lock()
			h.conns = append(h.conns, c)
			h.mu.Unlock()
		}
	}()
	tb.Cleanup(h.close)
	return h
}

func (h *hungListener) addr() string { return h.lis.Addr().String() }

func (h *hungListener) accepted() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.conns)
}

func (h *hungListener) close() {
	h.lis.Close()
	<-h.done
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, c := range h.conns {
		c.Close()
	}
}

// attemptCounter counts the client's RPC attempts per method.
type attemptCounter struct {
	mu sync.Mutex
	n  map[string]int
}

func (a *attemptCounter) option() kmsclient.Option {
	return kmsclient.WithDialOptions(grpc.WithChainUnaryInterceptor(
		func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			a.mu.Lock()
			if a.n == nil {
				a.n = map[string]int{}
			}
			a.n[method[strings.LastIndex(method, "/")+1:]]++
			a.mu.Unlock()
			return invoker(ctx, method, req, reply, cc, opts...)
		}))
}

func (a *attemptCounter) total() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, v := range a.n {
		n += v
	}
	return n
}

func (a *attemptCounter) reset() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.n = nil
}

// logRecorder is a slog handler that keeps records' messages and attributes.
type logRecorder struct {
	mu   sync.Mutex
	recs []string
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Level.String() + " " + r.Message)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	l.mu.Lock()
	l.recs = append(l.recs, b.String())
	l.mu.Unlock()
	return nil
}
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecorder) WithGroup(string) slog.Handler      { return l }

// matching returns the records that contain every one of subs.
func (l *logRecorder) matching(subs ...string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, r := range l.recs {
		if !slices.ContainsFunc(subs, func(s string) bool { return !strings.Contains(r, s) }) {
			out = append(out, r)
		}
	}
	return out
}

// all returns every record.
func (l *logRecorder) all() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.recs)
}
