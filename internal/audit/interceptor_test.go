package audit_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

const (
	encryptRPC = "/cairn.kms.v1.KMS/Encrypt"
	clientID   = "spiffe://cairn.test/client/us-east/demo"
	serverID   = "spiffe://cairn.test/kms/us-east/kms-1"
)

// plaintextMarker must never reach the audit log.
var plaintextMarker = []byte("PLAINTEXT-DEK-0123456789abcdef")

// fakeKMS is a real gRPC KMS service whose Encrypt counts its calls and
// annotates the audit target with a key version, as the real one will.
type fakeKMS struct {
	kmsv1.UnimplementedKMSServer
	calls atomic.Int32
}

func (f *fakeKMS) Encrypt(ctx context.Context, req *kmsv1.EncryptRequest) (*kmsv1.EncryptResponse, error) {
	f.calls.Add(1)
	audit.AddTarget(ctx, audit.Target{KeyVersion: 7})
	if audit.RequestID(ctx) == "" {
		return nil, status.Error(codes.Internal, "no request id in handler context")
	}
	if strings.HasPrefix(req.GetKeyset(), "fail/") {
		return nil, status.Error(codes.FailedPrecondition, "keyset is failing")
	}
	return &kmsv1.EncryptResponse{Ciphertext: append([]byte("ct:"), req.GetPlaintext()...), KeyId: 7}, nil
}

type fixture struct {
	client kmsv1.KMSClient
	kms    *fakeKMS
}

func start(t *testing.T, log *audit.Log, opts audit.InterceptorOptions, policy identity.Policy) fixture {
	t.Helper()
	pki := identitytest.New(t, identitytest.TrustDomain)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(pki.ServerCredentials(serverID)), grpc.ChainUnaryInterceptor(
		identity.UnaryServerInterceptor(),
		audit.UnaryServerInterceptor(log, opts),
		identity.UnaryAuthorizeInterceptor(policy),
	))
	kms := &fakeKMS{}
	kmsv1.RegisterKMSServer(srv, kms)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(pki.ClientCredentials(clientID)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); srv.Stop(); <-done })
	return fixture{client: kmsv1.NewKMSClient(conn), kms: kms}
}

func allowEncrypt() identity.Policy { return identity.Policy{encryptRPC: identity.AllowAny()} }

func encrypt(t *testing.T, c kmsv1.KMSClient, keyset string, md ...string) (*kmsv1.EncryptResponse, metadata.MD, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if len(md) > 0 {
		ctx = metadata.AppendToOutgoingContext(ctx, md...)
	}
	var header metadata.MD
	resp, err := c.Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: keyset, Plaintext: plaintextMarker, AssociatedData: []byte("ad")}, grpc.Header(&header))
	return resp, header, err
}

func TestInterceptorRecordsCalls(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	log, err := audit.Open(path, audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	f := start(t, log, audit.InterceptorOptions{Mutating: []string{encryptRPC}}, allowEncrypt())

	_, header, err := encrypt(t, f.client, "payments/ledger", audit.RequestIDHeader, "client-req-1")
	if err != nil {
		t.Fatalf("Encrypt = %v", err)
	}
	// A success does not echo the ID (the client knows it, or did not ask).
	if got := header.Get(audit.RequestIDHeader); len(got) != 0 {
		t.Errorf("response %s of a successful call = %v, want none", audit.RequestIDHeader, got)
	}
	// A malformed client request ID is replaced, not trusted; a failed call
	// returns the ID it was recorded under.
	_, header, err = encrypt(t, f.client, "fail/ledger", audit.RequestIDHeader, "bad id with spaces")
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("Encrypt(fail/ledger) = %v, want FailedPrecondition", err)
	}
	generated := header.Get(audit.RequestIDHeader)
	if len(generated) != 1 || len(generated[0]) < 18 || generated[0] == "bad id with spaces" {
		t.Fatalf("response %s for a malformed client ID = %v, want a generated ID", audit.RequestIDHeader, generated)
	}
	// A hostile keyset name is recorded safely, and the call still works.
	if _, _, err := encrypt(t, f.client, "evil\nkeyset\x00"); err != nil {
		t.Fatalf("Encrypt(hostile keyset name) = %v", err)
	}

	recs, err := audit.ReadFile(path)
	if err != nil {
		t.Fatalf("ReadFile = %v", err)
	}
	if len(recs) != 6 {
		t.Fatalf("got %d records, want 6 (attempt + outcome for each of 3 calls): %+v", len(recs), recs)
	}
	want := []struct {
		outcome audit.Outcome
		rid     string
		target  audit.Target
	}{
		{audit.OutcomeAttempt, "client-req-1", audit.Target{Keyset: "payments/ledger"}},
		{audit.OutcomeOK, "client-req-1", audit.Target{Keyset: "payments/ledger", KeyVersion: 7}},
		{audit.OutcomeAttempt, generated[0], audit.Target{Keyset: "fail/ledger"}},
		{audit.OutcomeError, generated[0], audit.Target{Keyset: "fail/ledger", KeyVersion: 7}},
		{audit.OutcomeAttempt, "", audit.Target{Keyset: `"evil\nkeyset\x00"`}},
		{audit.OutcomeOK, "", audit.Target{Keyset: `"evil\nkeyset\x00"`, KeyVersion: 7}},
	}
	for i, w := range want {
		r := recs[i]
		if r.Outcome != w.outcome || r.Target != w.target || r.Identity != clientID || r.Operation != encryptRPC {
			t.Errorf("record %d = %+v, want outcome %s, target %+v, identity %s, operation %s", i, r, w.outcome, w.target, clientID, encryptRPC)
		}
		if w.rid != "" && r.RequestID != w.rid {
			t.Errorf("record %d request id = %q, want %q", i, r.RequestID, w.rid)
		}
	}
	assertNoPlaintext(t, path)
}

func TestInterceptorAuditsRefusals(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	log, err := audit.Open(path, audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	onlyOthers := identity.Policy{encryptRPC: identity.NewAllowlist(identity.MustParsePattern("client/eu-west/*", identitytest.TrustDomain)).Authorize}
	f := start(t, log, audit.InterceptorOptions{}, onlyOthers)

	_, header, err := encrypt(t, f.client, "payments/ledger")
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Encrypt by an identity off the ACL = %v, want PermissionDenied", err)
	}
	if n := f.kms.calls.Load(); n != 0 {
		t.Errorf("handler ran %d times for a refused call, want 0", n)
	}
	recs, err := audit.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 1 || recs[0].Outcome != audit.OutcomeDenied || recs[0].Code != "PermissionDenied" || recs[0].Identity != clientID {
		t.Fatalf("records = %+v, want one denied record for %s", recs, clientID)
	}
	if got := header.Get(audit.RequestIDHeader); len(got) != 1 || got[0] != recs[0].RequestID {
		t.Errorf("response %s of the refused call = %v, want [%s] (its audit record's)", audit.RequestIDHeader, got, recs[0].RequestID)
	}
}

// TestInterceptorFailsClosed: when the audit sink fails, the operation fails.
func TestInterceptorFailsClosed(t *testing.T) {
	devFull := func(t *testing.T) *audit.Log {
		f, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
		if err != nil {
			t.Fatalf("opening /dev/full (the full-disk simulation needs Linux): %v", err)
		}
		t.Cleanup(func() { f.Close() })
		return audit.NewWriter(f, audit.Options{})
	}
	closedLog := func(t *testing.T) *audit.Log {
		l, err := audit.Open(filepath.Join(t.TempDir(), "audit.log"), audit.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		return l
	}
	tests := []struct {
		name      string
		log       func(*testing.T) *audit.Log
		mutating  bool
		wantCalls int32 // handler runs: 0 for mutating (refused up front), 1 otherwise (result withheld)
	}{
		{"full disk, mutating", devFull, true, 0},
		{"full disk, read", devFull, false, 1},
		{"closed log, mutating", closedLog, true, 0},
		{"closed log, read", closedLog, false, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var opts audit.InterceptorOptions
			if tt.mutating {
				opts.Mutating = []string{encryptRPC}
			}
			f := start(t, tt.log(t), opts, allowEncrypt())
			resp, _, err := encrypt(t, f.client, "payments/ledger")
			if status.Code(err) != codes.Unavailable || resp != nil {
				t.Fatalf("Encrypt with a failing audit log = (%v, %v), want (nil, Unavailable)", resp, err)
			}
			if got := f.kms.calls.Load(); got != tt.wantCalls {
				t.Errorf("handler ran %d times, want %d", got, tt.wantCalls)
			}
		})
	}
}

func assertNoPlaintext(t *testing.T, path string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(data, plaintextMarker) {
		t.Errorf("audit log %s contains request plaintext", path)
	}
}

// TestInterceptorUnaudited: a method on the unaudited list writes nothing
// (and so works even with a broken sink); every other method still does.
func TestInterceptorUnaudited(t *testing.T) {
	f, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fx := start(t, audit.NewWriter(f, audit.Options{}), audit.InterceptorOptions{Unaudited: []string{encryptRPC}}, allowEncrypt())
	if _, _, err := encrypt(t, fx.client, "payments/ledger"); err != nil {
		t.Errorf("Encrypt on the unaudited list with a full audit sink = %v, want success", err)
	}
	path := filepath.Join(t.TempDir(), "audit.log")
	log, err := audit.Open(path, audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	fx = start(t, log, audit.InterceptorOptions{Unaudited: []string{"/cairn.kms.v1.KMS/Decrypt"}}, allowEncrypt())
	if _, _, err := encrypt(t, fx.client, "payments/ledger"); err != nil {
		t.Fatal(err)
	}
	if recs, err := audit.ReadFile(path); err != nil || len(recs) != 1 {
		t.Errorf("records for a method not on the list = %d, %v; want 1", len(recs), err)
	}
}

// blockingSink is an audit sink whose first Write blocks until release is
// closed; entered is closed when it starts blocking.
type blockingSink struct {
	once             atomic.Bool
	entered, release chan struct{}
}

func (b *blockingSink) Write(p []byte) (int, error) {
	if b.once.CompareAndSwap(false, true) {
		close(b.entered)
		<-b.release
	}
	return len(p), nil
}

// TestInterceptorHungSink: while the audit sink hangs, a call behind the
// hung write returns (on the server, not only at the client) when its
// deadline passes, refused and without its result, instead of holding a
// server goroutine until the sink comes back.
func TestInterceptorHungSink(t *testing.T) {
	sink := &blockingSink{entered: make(chan struct{}), release: make(chan struct{})}
	log := audit.NewWriter(sink, audit.Options{})
	pki := identitytest.New(t, identitytest.TrustDomain)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// returned receives each call's outcome as the server's interceptors
	// finish with it.
	returned := make(chan error, 4)
	srv := grpc.NewServer(grpc.Creds(pki.ServerCredentials(serverID)), grpc.ChainUnaryInterceptor(
		func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			resp, err := h(ctx, req)
			returned <- err
			return resp, err
		},
		identity.UnaryServerInterceptor(),
		audit.UnaryServerInterceptor(log, audit.InterceptorOptions{}),
		identity.UnaryAuthorizeInterceptor(allowEncrypt()),
	))
	kmsv1.RegisterKMSServer(srv, &fakeKMS{})
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(pki.ClientCredentials(clientID)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); srv.Stop(); <-done })
	c := kmsv1.NewKMSClient(conn)

	first := make(chan error, 1)
	go func() { _, _, err := encrypt(t, c, "payments/ledger"); first <- err }()
	select {
	case <-sink.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the first call's audit record never reached the sink")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	resp, err := c.Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: "payments/ledger", Plaintext: plaintextMarker})
	if resp != nil || status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("Encrypt behind a hung audit sink = (%v, %v), want (nil, DeadlineExceeded)", resp, err)
	}
	select {
	case err := <-returned:
		if err == nil {
			t.Errorf("the server answered the call behind the hung sink with its result, want a refusal")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the server still holds the call behind the hung audit sink after its deadline")
	}
	close(sink.release)
	if err := <-first; err != nil {
		t.Errorf("the first call once the sink came back = %v", err)
	}
}

// TestMutatingCallNotRunAfterItsDeadline: a state-changing call whose
// attempt record is the write that hangs in the sink (its writer waits for
// the sink whatever its context says) is refused at its deadline, and when
// the sink comes back its handler does not run: the caller was told the
// call failed, so the change must not happen behind its back. The outcome
// record says why (DeadlineExceeded, or Canceled when the client's reset
// reached the server first).
func TestMutatingCallNotRunAfterItsDeadline(t *testing.T) {
	sink := &blockingSink{entered: make(chan struct{}), release: make(chan struct{})}
	var buf strings.Builder
	log := audit.NewWriter(io.MultiWriter(sink, &buf), audit.Options{})
	pki := identitytest.New(t, identitytest.TrustDomain)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	returned := make(chan error, 1)
	fake := &fakeKMS{}
	srv := grpc.NewServer(grpc.Creds(pki.ServerCredentials(serverID)), grpc.ChainUnaryInterceptor(
		func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			resp, err := h(ctx, req)
			returned <- err
			return resp, err
		},
		identity.UnaryServerInterceptor(),
		audit.UnaryServerInterceptor(log, audit.InterceptorOptions{Mutating: []string{"/cairn.kms.v1.KMS/Encrypt"}}),
		identity.UnaryAuthorizeInterceptor(allowEncrypt()),
	))
	kmsv1.RegisterKMSServer(srv, fake)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(pki.ClientCredentials(clientID)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); srv.Stop(); <-done })

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	resp, err := kmsv1.NewKMSClient(conn).Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: "payments/ledger", Plaintext: plaintextMarker})
	if resp != nil || status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("Encrypt whose attempt record hangs = (%v, %v), want (nil, DeadlineExceeded)", resp, err)
	}
	select {
	case <-sink.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the attempt record never reached the sink")
	}
	// The server's deadline (from the grpc-timeout header, counted from
	// when the call arrived) ends a little after the client's: let it pass
	// before the sink comes back.
	time.Sleep(500 * time.Millisecond)
	close(sink.release)
	select {
	case err := <-returned:
		if c := status.Code(err); c != codes.DeadlineExceeded && c != codes.Canceled {
			t.Errorf("the server's answer once the sink came back = %v, want DeadlineExceeded or Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the server never finished the call after the sink came back")
	}
	if n := fake.calls.Load(); n != 0 {
		t.Errorf("the handler ran %d time(s) after the caller's deadline, want 0", n)
	}
	if err := log.Close(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), `"outcome":"error","code":"DeadlineExceeded"`) && !strings.Contains(buf.String(), `"outcome":"error","code":"Canceled"`) {
		t.Errorf("audit records %s: want an error outcome record (DeadlineExceeded or Canceled)", buf.String())
	}
}
